"""What stage logs must and must not show."""

# What a stage's stderr must never show: any of the three, in any form.
NOISE_MARKERS = ("absl::InitializeLog", "oneDNN custom operations", "use_unbounded_threadpool")
TIMED_LAST_LINE = r"^{stage}: .+ in \d+\.\d s$"
