#!/usr/bin/env bash
# Pull the pipeline's data and models from the team's MinIO remote, or, where the repository
# has none of its secrets (a fork, a fresh copy) and the caller allows it, pull nothing:
# `dvc repro` then rebuilds every stage, fetching the photos from params.yaml's
# download.base_url and the ImageNet backbone from Keras' public URL.
#
#   MINIO_ENDPOINT=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... bash .github/scripts/pull.sh
#   REBUILD_WITHOUT_REMOTE=true bash .github/scripts/pull.sh   # no secrets: rebuild instead
#
# Writes the step output data-source=remote|public (to $GITHUB_OUTPUT on GitHub Actions),
# which the report turns into a note.
set -euo pipefail

secrets=(MINIO_ENDPOINT AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY)
set_count=0
for name in "${secrets[@]}"; do
  [ -n "${!name:-}" ] && set_count=$((set_count + 1))
done
output=${GITHUB_OUTPUT:-/dev/null}

# Photos accepted from feedback (`dandelion review accept`) are tracked by this file once the
# first one is accepted; they are in the team's remote only, and the split stage needs them.
# A copy of dvc.yaml's reviewed_dir (+ .dvc), kept in step by tests/infra/test_workflows.py.
reviewed=data/reviewed.dvc

if [ "$set_count" -eq 0 ] && [ "${REBUILD_WITHOUT_REMOTE:-false}" = true ]; then
  if [ -f "$reviewed" ]; then
    echo "pull: no MinIO secrets in this repository, and the pipeline needs the reviewed" \
      "photos $reviewed tracks, which only the team's remote holds: a rebuild from the" \
      "public data URL cannot reproduce it; add the MinIO secrets (docs/ci.md)" >&2
    exit 1
  fi
  echo "pull: no MinIO secrets in this repository, nothing pulled;" \
    "dvc repro rebuilds every stage from the public data URL (params.yaml download.base_url)"
  echo "data-source=public" >>"$output"
  exit 0
fi
# Some but not all set is a mistake to report, not a reason to quietly rebuild.
if [ "$set_count" -ne "${#secrets[@]}" ]; then
  missing=()
  for name in "${secrets[@]}"; do [ -n "${!name:-}" ] || missing+=("$name"); done
  echo "pull: ${missing[*]} not set: add the repository secrets MINIO_ENDPOINT," \
    "MINIO_ACCESS_KEY (passed as AWS_ACCESS_KEY_ID) and MINIO_SECRET_KEY" \
    "(passed as AWS_SECRET_ACCESS_KEY); see docs/ci.md" >&2
  exit 1
fi

# The endpoint goes into .dvc/config.local, for this run only; the keys stay in the env.
dvc remote modify --local minio endpointurl "$MINIO_ENDPOINT"
# --allow-missing: outputs a branch has not pushed yet are rebuilt by `dvc repro`;
# wrong credentials or an unreachable endpoint still fail here.
dvc pull --allow-missing
# Except the reviewed photos: no stage outputs them, so nothing would rebuild them.
if [ -f "$reviewed" ]; then
  dvc pull "$reviewed"
fi
echo "data-source=remote" >>"$output"
