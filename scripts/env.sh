# Sourced by the scripts: one persistent target dir outside the clone, shared by
# every checkout and CI run on this machine, so FAISS (cmake, ~7 min) builds once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shoal/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"
