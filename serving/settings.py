"""Every tunable of the prediction service, and why each is what it is.

Standard library only, and nothing happens on import: the deployment checks, the tests and the
package stage read these without BentoML, a model or a store. The measurements behind the
choices are in docs/benchmarks.md and docs/serving.md (*Faults and overload*), never here.
The model's own limits (upload size, pixels, files per batch, the decision threshold) are not
here either: they come from params.yaml in the packaged model's card (serving/contract.py).
"""

from __future__ import annotations

# --- the front -----------------------------------------------------------------------------

# Both front services (serving/service.py) take this BentoML name: the dashboards and alert
# rules select runner_name="DandelionService", whichever engine the bento serves.
SERVICE_NAME = "DandelionService"

# A request gets its answer or an error within this (BentoML's traffic timeout). Deployments
# give a stopping pod longer than this (compose stop_grace_period, Kubernetes
# terminationGracePeriodSeconds; tests/infra checks both against it).
TRAFFIC_TIMEOUT_SECONDS = 60
TRAFFIC = {"timeout": TRAFFIC_TIMEOUT_SECONDS}  # BentoML's traffic settings of each service
# After SIGTERM the requests already accepted get this long to finish: no request outlives the
# traffic timeout anyway, so waiting longer would wait for nothing.
DRAIN_SECONDS = TRAFFIC_TIMEOUT_SECONDS
# /readyz asks the model service (Keras engine) with this timeout: a probe is answered well
# within the probes' own timeouts (deploy/kubernetes/base/deployment.yaml), ready or not.
READY_PROBE_SECONDS = 2

# Prediction requests admitted at once (a batch counts as one); past this a request gets 503
# with Retry-After at once, since waiting behind more would only delay every answer past the
# 1 s p95 objective of /predict (the arithmetic with the measured throughput: docs/serving.md,
# *Faults and overload*). Admission is decided once the body is read, so slow clients hold no
# place. BentoML's own `traffic.max_concurrency` is not used: its MaxConcurrencyMiddleware
# (bentoml/_internal/server/http/traffic.py) answers 429 with no Retry-After, and counts every
# request from its first byte, the page and static files included, before any body is read.
MAX_PREDICTIONS_IN_FLIGHT = 64
# Seconds a client should wait before sending again after a 503 (the Retry-After header).
RETRY_AFTER_SECONDS = 1

# The typed BentoML endpoints (`bentoml.SyncHTTPClient(url).predict(image=...)`). BentoML's
# own routes are matched before the mounted FastAPI app, so they cannot share its paths.
TYPED_PREDICT_ROUTE = "/api/predict"
TYPED_PREDICT_BATCH_ROUTE = "/api/predict_batch"
TYPED_FEEDBACK_ROUTE = "/api/feedback"
# The multipart fields the prediction endpoints read, and the typed endpoints' parameters: the
# handlers, /openapi.json and the clients all use these names.
IMAGE_FIELD = "image"
IMAGES_FIELD = "images"

# Decimals of the probabilities, confidence and novelty in an answer (serving/api.py
# `rounded`, after the decision). Four keep a score that is at least 0.00005 away from 0 or 1
# apart from it (0.9999, not 1.0), far finer than 60 test photos can calibrate; and four is the
# most at which every rounded number is written in plain decimals: Python's JSON writes 1e-05
# for 0.00001, the very notation that rounding is there to avoid.
ANSWER_DECIMALS = 4

# --- the API key (serving/auth.py; docs/serving.md, *API keys*) ----------------------------

# The keys a request must present, read when the service starts: API_KEYS (comma-separated) or
# API_KEYS_FILE (one key per line; blank lines and lines starting with # ignored), never both.
# Neither set: the service is open (the laptop default, said in the start-up log).
API_KEYS_ENV = "API_KEYS"
API_KEYS_FILE_ENV = "API_KEYS_FILE"
# A request presents a key in this header, or as `Authorization: Bearer <key>` (what
# BentoML's clients send with token=, and Prometheus's and the PodMonitor's authorization).
API_KEY_HEADER = "X-API-Key"
# Shorter keys are refused at the start: a key is a random secret, not a password to remember
# (`dandelion secrets` writes 32 random bytes); 16 characters rule out placeholders like
# "changeme" and keys guessable online.
MIN_API_KEY_CHARS = 16
# API_KEYS_FILE is looked at again (its mtime) at most this often, and read again when it has
# changed: a rotated Kubernetes Secret or edited file takes effect within seconds, no restart.
API_KEYS_FILE_CHECK_SECONDS = 5.0

# --- the model service (Keras engine only) -------------------------------------------------

# Adaptive batching: at most this many images per model call, and at most this long for a
# request between arriving and its batch's answer.
MAX_BATCH_SIZE = 32
MAX_LATENCY_MS = 5000
# The front's client for the model service replaces its HTTP session every 100 requests or
# 300 s by default, and closes the old one with requests still in flight, which then fail with
# "Server disconnected": keep one session for the process's life.
MODEL_SERVICE_CONNECTION = {"max_requests": 2**31 - 1, "max_age": 1e9}

# --- reading uploads -----------------------------------------------------------------------

# A body must keep arriving: no pause longer than STALL_SECONDS, and after the first
# STALL_SECONDS at least MIN_BYTES_PER_SECOND on average. Slower clients get 408 within
# seconds instead of holding a connection until the traffic timeout. The rate is a slow mobile
# uplink; a photo at the upload limit sent slower than that would outlive the traffic timeout.
STALL_SECONDS = 5.0
MIN_BYTES_PER_SECOND = 32 * 1024
# A request may declare at most (files it may hold) x (the card's max_upload_bytes) plus this
# much: room for the multipart boundaries and part headers, never for another photo.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Text fields a form may carry beside its files (clients add a few); more is not an upload.
EXTRA_FORM_FIELDS = 16
# How much of a multipart body's end is kept to find its closing boundary (room for an
# epilogue, which multipart allows after it).
CLOSING_BOUNDARY_WINDOW = 1024
# Requests declaring more than this (a batch of big photos) are read and decoded one at a
# time, the others waiting before their body is read: small requests share the cores with
# one big request at most, and big requests hold the memory of one.
LARGE_REQUEST_BYTES = 32_000_000

# --- decoding and scoring ------------------------------------------------------------------

# The image formats an upload may be in, as Pillow names them: its decoders for these, and no
# others, ever read an upload's bytes (a phone's multi-picture JPEG, MPO, is a JPEG). Each is
# a photo format that browsers and phones write; each other Pillow decoder would be more code
# parsing untrusted bytes, for formats nobody sends a photo in.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# Uploads are decoded in worker threads, in two lanes, so that small photos never queue behind
# large ones: files up to LARGE_UPLOAD_BYTES (any phone JPEG of a few megapixels is larger) in
# up to SMALL_DECODE_THREADS threads, one per core of the machines the service is sized for
# (deploy/kubernetes); larger ones one at a time, in a thread of lower CPU priority (nice
# +LARGE_DECODE_NICENESS), so that they use what small requests leave.
SMALL_DECODE_THREADS = 2
LARGE_UPLOAD_BYTES = 1_000_000
LARGE_DECODE_NICENESS = 10
# Engine calls at once in the front's process: the engine already uses every core for one.
INFERENCE_CALLS = 1
# glibc malloc (serving/resources.py): blocks of at least MMAP_THRESHOLD_BYTES (an uploaded
# photo's bytes, its decoded pixels) are mapped and unmapped on their own, so they are given
# back when freed; and MALLOC_ARENAS arenas bound what the decoding threads keep.
MMAP_THRESHOLD_BYTES = 1 << 20
MALLOC_ARENAS = 2

# --- metrics -------------------------------------------------------------------------------

# Confidence = the probability of the label returned. Answers at or below LOW_CONFIDENCE are
# "low confidence"; the dashboards and the alert rules read that bucket (le="0.7"). The lowest
# edge is chance for two classes: an answer below it is less likely than the other class,
# which happens only when the card's threshold is not the middle.
LOW_CONFIDENCE = 0.7
CONFIDENCE_BUCKETS = (0.5, 0.6, LOW_CONFIDENCE, 0.8, 0.9, 0.95, 0.99, 1.0)
# Images per engine call: powers of 2 up to the largest batch the model service makes. (In the
# front, a /predict_batch is one call of up to the card's max_batch_files, the same order.)
IMAGES_PER_CALL_BUCKETS = tuple(
    sorted({2**power for power in range(MAX_BATCH_SIZE.bit_length())} | {MAX_BATCH_SIZE})
)
# Each service process publishes its RSS and CPU time this often: a few samples per scrape
# interval of deploy/monitoring/prometheus.yml, not a busy loop.
PROCESS_SAMPLE_SECONDS = 5.0

# --- feedback (POST /feedback; docs/serving.md, *Feedback*) -------------------------------

# Where feedback goes is the deployment's choice, read from these environment variables when
# the service starts (never a model param: the same bento serves any deployment).
# FEEDBACK_STORE: s3://bucket/prefix, or a directory; unset, FEEDBACK_DIR/store. The S3 store
# takes the standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the DVC remote's secrets) and
# FEEDBACK_S3_ENDPOINT_URL for an S3-compatible server (MinIO).
FEEDBACK_STORE_ENV = "FEEDBACK_STORE"
FEEDBACK_S3_ENDPOINT_ENV = "FEEDBACK_S3_ENDPOINT_URL"
# FEEDBACK_DIR holds the spool (FEEDBACK_DIR/spool), and the store when none is configured. A
# deployment mounts a volume there: the spool holds feedback accepted and not yet stored.
FEEDBACK_DIR_ENV = "FEEDBACK_DIR"
DEFAULT_FEEDBACK_DIR = "~/dandelion-feedback"
FEEDBACK_ROUTE = "/feedback"
# The multipart text fields of a feedback, beside its photo (IMAGE_FIELD); no others.
FEEDBACK_FIELDS = ("label", "answer_id", "model_version", "comment")
# The label that says the photo is of no class (the answers' `neither`).
NEITHER_LABEL = "neither"
# A comment is a note for the reviewer, not a document: a few sentences.
MAX_COMMENT_CHARS = 1000
# A model_version quoted by a feedback: the card's are 16 hex digits; 64 leaves room for
# other schemes (a whole sha256) and bounds what a record keeps of a client's text.
MAX_MODEL_VERSION_CHARS = 64
# The spool keeps what the store cannot take yet, on disk. Bounded, so that a store down for
# long fills no disk: past either bound feedback is refused (503), never accepted and dropped.
# 2 GiB hold 200 photos at the upload limit, about 600 phone photos; at a few feedbacks a
# minute, hours of an outage.
SPOOL_MAX_ENTRIES = 1000
SPOOL_MAX_BYTES = 2 * 1024**3
# A full spool empties only once the store is back: a client should not come back at once.
SPOOL_FULL_RETRY_AFTER_SECONDS = 60
# While the store fails, the flusher tries again this often (and at each new feedback).
FLUSH_RETRY_SECONDS = 5.0
# One store call gives up after these (connect, read): a store that is down must not hold
# the flusher, or the shutdown's last flush, for long.
STORE_TIMEOUT_SECONDS = (2.0, 10.0)
# Each feedback's photo is scored by the served model, as /predict would answer it, so that
# /metrics counts the answers feedback confirms and corrects (serving/feedback.py). A
# feedback is never refused for that: past this (a model service down or overloaded, with
# the Keras engine) it is accepted unscored. Well within the traffic timeout, and far above
# an engine call (milliseconds; docs/benchmarks.md).
FEEDBACK_SCORING_SECONDS = 10.0
# What a feedback says of the served model's answer for its photo: the same label, or another.
FEEDBACK_OUTCOMES = ("confirmed", "corrected")
# On SIGTERM, after the open requests, the flusher gets at most this long (within the drain's
# DRAIN_SECONDS) to store what the spool holds; the rest stays spooled, for the next start.
SHUTDOWN_FLUSH_SECONDS = 10.0

# --- the prediction log (docs/serving.md, *Prediction log*) --------------------------------

# Where answers are logged is the deployment's choice, read from these environment variables
# when the service starts (serving/prediction_log.py). PREDICTION_LOG: the sinks, "files",
# "s3" or both ("files,s3"), or "off". Files by default: a log needs no store to be useful,
# and the disk it may use is bounded below.
PREDICTION_LOG_ENV = "PREDICTION_LOG"
PREDICTION_LOG_SINKS = ("files", "s3")
PREDICTION_LOG_OFF = "off"
DEFAULT_PREDICTION_LOG = "files"
# The log's directory: its files, and with the s3 sink alone the files not yet uploaded. A
# deployment mounts a volume there to keep the log across restarts.
PREDICTION_LOG_DIR_ENV = "PREDICTION_LOG_DIR"
DEFAULT_PREDICTION_LOG_DIR = "~/dandelion-predictions"
# PREDICTION_LOG_STORE: s3://bucket/prefix (required by the s3 sink); credentials from
# boto3's standard chain, PREDICTION_LOG_S3_ENDPOINT_URL for an S3-compatible server (MinIO).
# Its own variables, not FEEDBACK_STORE's: a log of every answer and a few reviewed photos
# have other owners, retention and access.
PREDICTION_LOG_STORE_ENV = "PREDICTION_LOG_STORE"
PREDICTION_LOG_S3_ENDPOINT_ENV = "PREDICTION_LOG_S3_ENDPOINT_URL"
# "1" keeps each answered photo (by sha256), so that `dandelion replay` can score it again;
# "0", the default: users' photos are not kept unless the deployment says so (privacy).
PREDICTION_LOG_KEEP_PHOTOS_ENV = "PREDICTION_LOG_KEEP_PHOTOS"
PREDICTION_LOG_KEEP_PHOTOS_VALUES = {"0": False, "1": True}
# Records (and photos) wait for the writer thread in memory, at most this many and this many
# bytes: past either a record is dropped and counted, since logging must never slow or fail
# an answer. 10,000 records are a minute of the measured peak throughput (docs/benchmarks.md)
# with the writer stalled; 64 MiB hold a few photos at the upload limit besides.
PREDICTION_LOG_BUFFER_RECORDS = 10_000
PREDICTION_LOG_BUFFER_BYTES = 64 * 1024**2
# What a record counts for in that byte bound (a record's line is about 400 bytes), on top of
# its photo: estimated, so that record() serialises nothing on the request path.
PREDICTION_LOG_RECORD_BYTES = 512
# A file is closed (and then uploaded whole) past this size or this age, whichever comes
# first: the age bound gets a quiet service's answers into the store within the hour.
PREDICTION_LOG_FILE_BYTES = 16 * 1024**2
PREDICTION_LOG_FILE_SECONDS = 3600.0
# The log's directory holds at most this many closed files and this many bytes (records and
# kept photos): past either the oldest go, counted as dropped unless a store has them. 1 GiB
# is about 2.5 million records without photos.
PREDICTION_LOG_MAX_FILES = 1000
PREDICTION_LOG_MAX_BYTES = 1024**3
# While the store fails, the uploader tries again this often; each call gives up after
# STORE_TIMEOUT_SECONDS, as the feedback flusher's.
PREDICTION_LOG_UPLOAD_RETRY_SECONDS = 5.0

# --- the challenger (serving/challenger.py; docs/serving.md, *Challenger: shadow and canary*) -

# A second model beside the champion, named by the deployment when the service starts (never a
# model param: which model challenges which is a rollout's decision, not a training's).
# CHALLENGER: a bento tag in BentoML's store (dandelion-vs-grass:<version>) or a bento archive.
CHALLENGER_ENV = "CHALLENGER"
# CHALLENGER_MODE: shadow (the default: it scores every photo the champion answers, and
# answers none) or canary (it answers CANARY_PERCENT of the requests).
CHALLENGER_MODE_ENV = "CHALLENGER_MODE"
SHADOW, CANARY = "shadow", "canary"
CHALLENGER_MODES = (SHADOW, CANARY)
# A shadow answer agrees with the champion's when both label and neither are the same.
AGREE, DISAGREE = "agree", "disagree"
SHADOW_OUTCOMES = (AGREE, DISAGREE)
CANARY_PERCENT_ENV = "CANARY_PERCENT"
# Who answers, and how, in the model metrics' labels (classifier_model_*): each answer is a
# role's, served to the client or scored in shadow.
CHAMPION, CHALLENGER = "champion", "challenger"
ROLES = (CHAMPION, CHALLENGER)
SERVED_MODE = "served"
# The canary split is sticky: a client that sends this header always gets the same model; a
# request without it is split by the photo's sha256, so the same photo gets the same model.
CLIENT_KEY_HEADER = "X-Client-Key"
# The split's buckets: a hash's first 8 bytes modulo this, below CANARY_PERCENT x 100 to the
# challenger. Hundredths of a percent: finer than any share a rollout would choose.
CANARY_BUCKETS = 10_000
# Photos waiting for the shadow at most. The shadow scores off the request path; past this it
# sheds (classifier_shadow_shed_total) rather than queue behind a champion it cannot keep up
# with: a few seconds of a busy service's photos, and at most this many decoded photos
# (150 KB each at 224 px) in memory.
SHADOW_QUEUE_PHOTOS = 64
# Photos the shadow sends its worker in one call, from what its queue holds: fewer round trips
# when it falls behind, and never more than the champion's own batches.
SHADOW_CALL_PHOTOS = 8
# The challenger's engine runs in a child process, its own CPU priority apart from the front's.
# In shadow mode at the lowest priority (nice +19): it takes only the CPU the champion leaves,
# so it slows the champion little, and sheds when there is none (docs/benchmarks.md, *Shadow*).
# A canary answers clients: it runs at the front's priority.
SHADOW_NICENESS = 19
# One call of the challenger's worker gives up after this (the worker is then restarted): far
# above an engine call, well within the traffic timeout, so that a canary request whose
# challenger hangs is still answered by the champion in time.
CHALLENGER_CALL_SECONDS = 10.0
# Loading the challenger's engine in its worker (OpenVINO: a second or two; Keras: more).
CHALLENGER_START_SECONDS = 120.0
# A worker that died is started again after this, doubling at each failure up to the most:
# a challenger whose export is gone does not restart in a busy loop.
CHALLENGER_RESTART_SECONDS = (1.0, 60.0)
