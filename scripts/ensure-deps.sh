# Sourced by the other scripts: makes sure the build's few system tools are installed.
# The guest is assembled at build time with binutils (as, objcopy).
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (https://rustup.rs) and rerun" >&2
    exit 1
fi
if ! command -v as >/dev/null || ! command -v objcopy >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing binutils (as, objcopy) for the guest build" >&2
        apt-get update -qq && apt-get install -y -qq binutils >/dev/null
    else
        echo "binutils (as, objcopy) is missing: install it (e.g. apt-get install binutils)" >&2
        exit 1
    fi
fi
# iproute2 (ip, tc) builds the benchmark's link profiles and their tests (network namespaces,
# veth, tbf).
if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing iproute2 (ip, tc) for the link profiles" >&2
        apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
    else
        echo "iproute2 (ip, tc) is missing: install it (e.g. apt-get install iproute2)" >&2
        exit 1
    fi
fi
