#!/usr/bin/env bash
# Runs the decoder fuzz targets (overlay, depot, api `fuzz/` crates) with cargo-fuzz on
# the stable toolchain, each for a bounded time, and fails if any of them finds a crash, a hang
# or runs out of memory. CI (scripts/test.sh) runs it with `--ci`; run it by hand for longer.
#
#   scripts/fuzz.sh [--seconds N] [--rss-mb M] [--ci] [TARGET...]
#   scripts/fuzz.sh --install      only install cargo-fuzz (scripts/setup.sh calls this)
#
# TARGET is `crate/target` (`overlay/datagram`) or just `target`; default: all of them.
# --ci: 15 s per target (unless --seconds says otherwise) and a quicker build (16 codegen units
# instead of 1: builds faster, runs somewhat slower).
# Stable Rust: cargo-fuzz's default AddressSanitizer needs `-Zsanitizer` (nightly only), so the
# targets are built with `--sanitizer none`. The coverage instrumentation libFuzzer needs
# (`-Cpasses=sancov-module` and LLVM arguments) is stable; debug assertions and overflow checks
# stay on, so panics and arithmetic overflows are found, and memory use is bounded by
# `-rss_limit_mb`/`-malloc_limit_mb`. The decoders have no `unsafe`, which is what ASan would add.
#
# Builds go to target/fuzz (one target dir shared by the three fuzz crates, separate from the
# workspace build so neither waits on the other's lock; the crates name the same dependencies
# so each library is built once). New corpus entries go to <crate>/fuzz/corpus/<target>
# (ignored by git); the checked-in seeds in <crate>/fuzz/seeds/<target> are read too. Crashing
# inputs land in <crate>/fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# The cargo-fuzz release that CI and scripts/setup.sh install.
cargo_fuzz_version=0.13.2

install_cargo_fuzz() {
    if [[ $(cargo fuzz --version 2>/dev/null) != "cargo-fuzz $cargo_fuzz_version" ]]; then
        echo "== installing cargo-fuzz $cargo_fuzz_version" >&2
        cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
    fi
}

seconds=
rss_mb=2048
ci=
wanted=()
while (($#)); do
    case $1 in
        --seconds) seconds=$2; shift 2 ;;
        --rss-mb) rss_mb=$2; shift 2 ;;
        --ci) ci=1; shift ;;
        --install) install_cargo_fuzz; exit 0 ;;
        -h | --help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) wanted+=("$1"); shift ;;
    esac
done
[[ -n $seconds ]] || seconds=${ci:+15}
seconds=${seconds:-60}
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || { echo "--seconds needs a positive integer" >&2; exit 2; }
[[ $rss_mb =~ ^[0-9]+$ ]] || { echo "--rss-mb needs an integer" >&2; exit 2; }

install_cargo_fuzz

crates=(overlay depot api)
target_dir=$root/target/fuzz
log_dir=$target_dir/logs
mkdir -p "$log_dir"
flags=(--sanitizer none --target-dir "$target_dir")
[[ -z $ci ]] || flags+=(--codegen-units 16)

# Every crate/target pair, from the fuzz crates' manifests.
all=()
for c in "${crates[@]}"; do
    while read -r t; do
        [[ -n $t ]] && all+=("$c/$t")
    done < <(cd "$c" && cargo fuzz list)
done

selected=()
if ((${#wanted[@]} == 0)); then
    selected=("${all[@]}")
else
    for w in "${wanted[@]}"; do
        found=
        for a in "${all[@]}"; do
            if [[ $a == "$w" || ${a#*/} == "$w" ]]; then
                selected+=("$a")
                found=1
            fi
        done
        [[ -n $found ]] || { echo "no fuzz target $w (have: ${all[*]})" >&2; exit 2; }
    done
fi

failed=()
summary=()
for ct in "${selected[@]}"; do
    c=${ct%%/*}
    t=${ct#*/}
    echo "== $ct: build"
    if ! (cd "$c" && cargo fuzz build "${flags[@]}" "$t"); then
        line="$ct: FAILED: the fuzz target does not build (cargo's errors above)"
        echo "$line" >&2
        failed+=("$line")
        summary+=("$line")
        continue
    fi
    mkdir -p "$c/fuzz/corpus/$t"
    corpora=("fuzz/corpus/$t")
    [[ -d $c/fuzz/seeds/$t ]] && corpora+=("fuzz/seeds/$t")
    log=$log_dir/$c-$t.log
    echo "== $ct: fuzzing for ${seconds}s (log $log)"
    rc=0
    # -timeout: one input running longer than 10 s is a hang; -malloc_limit_mb: one
    # allocation above the RSS limit is a failure even if it is freed quickly.
    (cd "$c" && cargo fuzz run "${flags[@]}" "$t" "${corpora[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb="$rss_mb" -malloc_limit_mb="$rss_mb" \
        -timeout=10 -print_final_stats=1) >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
    line="$ct: ${runs:-?} runs in ${secs:-?} s, ${cov:-no coverage line}, corpus $(find "$c/fuzz/corpus/$t" -type f | wc -l) files"
    if ((rc != 0)); then
        # libFuzzer: "Test unit written to <path>" (crash-*, timeout-*, oom-*, slow-unit-*).
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        kind=$(grep -oE 'ERROR: libFuzzer: [a-z-]+|panicked at [^:]*:[0-9]+' "$log" | head -1 || true)
        echo "--- $ct: what libFuzzer reported (all of it in $log)" >&2
        grep -E -A8 "panicked at|ERROR: libFuzzer|^==[0-9]+== ERROR" "$log" | head -40 >&2 || tail -20 "$log" >&2
        line="$ct: FAILED (exit $rc${kind:+: $kind}): input ${artifact:-not written (see $log)}"
        [[ -z $artifact ]] || line+="; reproduce: (cd $c && cargo fuzz run ${flags[*]} $t $artifact)"
        failed+=("$line")
    fi
    echo "$line"
    summary+=("$line")
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo >&2
    echo "fuzzing FAILED in ${#failed[@]} of ${#selected[@]} targets:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
