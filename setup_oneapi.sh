# shellcheck shell=bash
# setup_oneapi.sh: set up Intel oneAPI and the GPU runtime variables for the ipex-llm backend.
#
# Source it (bash or zsh), do not run it, so the variables land in your shell:
#
#     source setup_oneapi.sh [arc|flex|max|igpu]     # default: arc
#     source setup_oneapi.sh --help
#
# It finds oneAPI through ONEAPI_ROOT or /opt/intel/oneapi (DPO_XPU_ONEAPI_DEFAULT overrides that default),
# sources its setvars.sh once per shell, and exports the variables Intel's ipex-llm guides give per GPU family.
# The native backend (PyTorch's own XPU device) needs only the GPU driver: it does not need this file.
# Start Python or Jupyter from the same shell afterwards.

_dpo_xpu_oneapi_usage() {
    cat <<'EOF'
Usage: source setup_oneapi.sh [arc|flex|max|igpu]    (default: arc)

Sources Intel oneAPI's setvars.sh (once per shell; found through ONEAPI_ROOT, else /opt/intel/oneapi)
and exports the runtime variables for the ipex-llm backend on this GPU family:
  all                  SYCL_CACHE_PERSISTENT=1
  arc, flex            USE_XETLA=OFF  SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS=1
  max (Data Center)    ENABLE_SDP_FUSION=1  SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS=1
                       and libtcmalloc in LD_PRELOAD when found
  igpu (Core Ultra)    BIGDL_LLM_XMX_DISABLED=1  SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS=1

The native backend (the default) needs only the Intel GPU driver and PyTorch's XPU wheels, not this file.
EOF
}

_dpo_xpu_oneapi_export() {
    export "$1=$2"
    printf '  export %s=%s\n' "$1" "$2"
}

_dpo_xpu_oneapi_setup() {
    local family="arc" default root lib tcmalloc="" rc=0
    case "${1:-}" in
        -h | --help)
            _dpo_xpu_oneapi_usage
            return 0
            ;;
        "") ;;
        arc | flex | max | igpu) family="$1" ;;
        *)
            printf "setup_oneapi.sh: unknown GPU family '%s': choose one of arc, flex, max, igpu (default arc)\n" \
                "$1" >&2
            return 1
            ;;
    esac
    if [ "$#" -gt 1 ]; then
        printf 'setup_oneapi.sh: one argument at most (the GPU family); see: source setup_oneapi.sh --help\n' >&2
        return 1
    fi

    default="${DPO_XPU_ONEAPI_DEFAULT:-/opt/intel/oneapi}"
    if [ -n "${ONEAPI_ROOT:-}" ] && [ -f "${ONEAPI_ROOT}/setvars.sh" ]; then
        root="${ONEAPI_ROOT}"
    elif [ -f "${default}/setvars.sh" ]; then
        root="${default}"
    else
        printf 'setup_oneapi.sh: no Intel oneAPI found: no setvars.sh under ONEAPI_ROOT=%s nor under %s.\n' \
            "${ONEAPI_ROOT:-(unset)}" "${default}" >&2
        printf '  The ipex-llm backend needs the Intel oneAPI Base Toolkit: install it (for example\n' >&2
        printf '  "apt install intel-oneapi-base-toolkit" from Intel'"'"'s apt repository), or set ONEAPI_ROOT\n' >&2
        printf '  to where it is installed. The native backend needs only the Intel GPU driver and\n' >&2
        printf '  PyTorch'"'"'s XPU wheels: it does not need this file.\n' >&2
        return 1
    fi

    if [ "${DPO_XPU_ONEAPI_SOURCED:-}" = "${root}" ] || [ "${SETVARS_COMPLETED:-}" = "1" ]; then
        printf 'setup_oneapi.sh: oneAPI from %s is already set up in this shell (setvars.sh not sourced again)\n' \
            "${root}"
    else
        set --  # setvars.sh reads the positional parameters: give it none
        . "${root}/setvars.sh" || rc=$?
        if [ "${rc}" -ne 0 ]; then
            printf 'setup_oneapi.sh: %s/setvars.sh failed (exit status %s)\n' "${root}" "${rc}" >&2
            return 1
        fi
        export DPO_XPU_ONEAPI_SOURCED="${root}"
        printf 'setup_oneapi.sh: sourced %s/setvars.sh\n' "${root}"
    fi

    # A family chosen before in this shell may have left variables the new family must not have.
    if [ -n "${DPO_XPU_GPU_FAMILY:-}" ] && [ "${DPO_XPU_GPU_FAMILY}" != "${family}" ]; then
        unset USE_XETLA ENABLE_SDP_FUSION BIGDL_LLM_XMX_DISABLED
    fi
    printf 'setup_oneapi.sh: GPU family %s:\n' "${family}"
    _dpo_xpu_oneapi_export DPO_XPU_GPU_FAMILY "${family}"
    _dpo_xpu_oneapi_export SYCL_CACHE_PERSISTENT 1
    _dpo_xpu_oneapi_export SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS 1
    case "${family}" in
        arc | flex) _dpo_xpu_oneapi_export USE_XETLA OFF ;;
        igpu) _dpo_xpu_oneapi_export BIGDL_LLM_XMX_DISABLED 1 ;;
        max)
            _dpo_xpu_oneapi_export ENABLE_SDP_FUSION 1
            for lib in "${CONDA_PREFIX:-/nonexistent}/lib/libtcmalloc.so" \
                /usr/lib/x86_64-linux-gnu/libtcmalloc.so /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4; do
                if [ -f "${lib}" ]; then
                    tcmalloc="${lib}"
                    break
                fi
            done
            if [ -z "${tcmalloc}" ]; then
                printf '  libtcmalloc not found (looked in $CONDA_PREFIX/lib and /usr/lib/x86_64-linux-gnu):\n'
                printf '  continuing without it; to add it: conda install -c conda-forge gperftools\n'
            else
                case ":${LD_PRELOAD:-}:" in
                    *":${tcmalloc}:"*) ;;
                    *) export LD_PRELOAD="${LD_PRELOAD:+${LD_PRELOAD}:}${tcmalloc}" ;;
                esac
                printf '  export LD_PRELOAD=%s\n' "${LD_PRELOAD}"
            fi
            ;;
    esac
    return 0
}

_dpo_xpu_oneapi_sourced=0
if [ -n "${ZSH_VERSION:-}" ]; then
    case "${ZSH_EVAL_CONTEXT:-}" in *:file*) _dpo_xpu_oneapi_sourced=1 ;; esac
elif [ -n "${BASH_VERSION:-}" ]; then
    # shellcheck disable=SC3028,SC3054
    [ "${BASH_SOURCE[0]}" != "$0" ] && _dpo_xpu_oneapi_sourced=1
else
    printf 'setup_oneapi.sh: needs bash or zsh; run: bash, then source setup_oneapi.sh\n' >&2
    unset _dpo_xpu_oneapi_sourced
    unset -f _dpo_xpu_oneapi_usage _dpo_xpu_oneapi_export _dpo_xpu_oneapi_setup
    return 1 2>/dev/null || exit 1
fi

if [ "${_dpo_xpu_oneapi_sourced}" = "1" ]; then
    unset _dpo_xpu_oneapi_sourced
    _dpo_xpu_oneapi_setup "$@"
    _dpo_xpu_oneapi_status=$?
    unset -f _dpo_xpu_oneapi_usage _dpo_xpu_oneapi_export _dpo_xpu_oneapi_setup
    eval "unset _dpo_xpu_oneapi_status; return ${_dpo_xpu_oneapi_status}"
fi

# Run as a program: the variables would vanish with this process, so say how to source it instead.
case "${1:-}" in
    -h | --help)
        _dpo_xpu_oneapi_usage
        exit 0
        ;;
esac
printf 'setup_oneapi.sh must be sourced, not run, so that its variables stay in your shell:\n' >&2
printf '    source setup_oneapi.sh [arc|flex|max|igpu]\n' >&2
exit 2
