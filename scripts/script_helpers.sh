# Sourced by the install scripts: die and quiet, each message named after the script that sourced it.
_SCRIPT_NAME="$(basename "${BASH_SOURCE[1]:-$0}")"

die() { echo "$_SCRIPT_NAME: error: $*" >&2; exit 1; }

# Run a command quietly; show the tail of its output only if it fails.
quiet() {
    local log rc
    log="$(mktemp)"
    if "$@" >"$log" 2>&1; then
        rm -f "$log"
        return 0
    else
        rc=$?  # inside else: after a bare `fi` $? would be the if's own status, 0
    fi
    echo "$_SCRIPT_NAME: command failed (exit $rc): $*" >&2
    tail -n 40 "$log" >&2
    rm -f "$log"
    return "$rc"
}
