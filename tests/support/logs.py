"""What stage logs must and must not show."""

# What a stage's stderr must never show: any of the three, in any form.
# Written by TensorFlow's libraries while they load, in any process that imports it.
START_UP_MARKERS = ("absl::InitializeLog", "oneDNN custom operations")
# And tf.data's MapDataset warning (Keras' predict() over an array builds such a pipeline).
NOISE_MARKERS = (*START_UP_MARKERS, "use_unbounded_threadpool")
TIMED_LAST_LINE = r"^{stage}: .+ in \d+\.\d s$"
