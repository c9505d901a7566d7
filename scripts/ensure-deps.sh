# Sourced by the other scripts: makes sure the build's few system tools are installed.
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (https://rustup.rs) and rerun" >&2
    exit 1
fi

# ensure_package PACKAGE WHY COMMAND...: installs PACKAGE (apt, as root) when a COMMAND is
# missing, or says what to install.
ensure_package() {
    local package=$1 why=$2 missing=0 cmd
    shift 2
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null || missing=1
    done
    [ "$missing" = 0 ] && return 0
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing $package ($*) for $why" >&2
        apt-get update -qq && apt-get install -y -qq "$package" >/dev/null
    else
        echo "$package ($*) is missing: install it (e.g. apt-get install $package)" >&2
        exit 1
    fi
}

# The guest is assembled at build time with binutils.
ensure_package binutils "the guest build" as objcopy
# The benchmark's link profiles and their tests (network namespaces, veth, htb).
ensure_package iproute2 "the link profiles" ip tc
# The test command checks the format and the lints.
for component in rustfmt clippy; do
    subcommand=${component/rustfmt/fmt}
    if ! cargo "$subcommand" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null; then
            echo "installing $component (rustup) for the test command's checks" >&2
            rustup component add "$component"
        else
            echo "cargo $subcommand is missing: install the $component component" >&2
            exit 1
        fi
    fi
done
