"""Export stage: the trained Keras model in the format of the engine that will serve it.

``serve.engine`` chooses (serving/engines.py): ``openvino`` converts the model to OpenVINO IR
with Keras' own exporter; ``openvino-int8`` quantizes that IR to INT8, calibrated on
``quantize.calibration_photos`` train photos (pipeline/quantize.py); ``keras`` copies the
Keras file. Evaluate scores this export and
the bento ships it, so the metrics describe exactly what is served. The conversion gives the
same bytes in every fresh process, so ``dvc.lock`` stays reproducible.
"""

from __future__ import annotations

import numpy as np

from pipeline.export import export_model
from pipeline.params import ParamsError, QuantizeParams, ServeParams
from pipeline.quantize import calibration_set
from pipeline.stage import arguments, summarised
from serving.contract import MODEL_FILE
from serving.engines import check_engine


@summarised("export")
def main(argv: list[str] | None = None) -> str:
    args = arguments(argv, __doc__, "model_dir", "export_dir", "train_npz")
    engine = ServeParams.load().engine
    try:
        check_engine(engine)
    except ValueError as error:
        raise ParamsError(f"params.yaml: {error}") from None
    calibration = None
    if engine == "openvino-int8":
        params = QuantizeParams.load()
        try:
            calibration = calibration_set(np.load(args.train_npz)["images"], params)
        except ValueError as error:
            raise ParamsError(f"params.yaml: {error}") from None
    export_model(args.model_dir / MODEL_FILE, args.export_dir, engine, calibration)
    return f"{args.model_dir / MODEL_FILE} -> {args.export_dir} ({engine})"


if __name__ == "__main__":
    main()
