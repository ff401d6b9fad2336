#!/usr/bin/env bash
# Runs the decoder fuzz targets (overlay, depot, api `fuzz/` crates) with cargo-fuzz on
# the stable toolchain, each for a bounded time, and fails if any of them finds a crash, a hang
# or runs out of memory. Not part of CI (too slow for its budget): run it by hand.
#
#   scripts/fuzz.sh [--seconds N] [--rss-mb M] [TARGET...]
#
# TARGET is `crate/target` (`overlay/datagram`) or just `target`; default: all of them.
# Stable Rust: cargo-fuzz's default AddressSanitizer needs `-Zsanitizer` (nightly only), so the
# targets are built with `--sanitizer none`. The coverage instrumentation libFuzzer needs
# (`-Cpasses=sancov-module` and LLVM arguments) is stable; debug assertions and overflow checks
# stay on, so panics and arithmetic overflows are found, and memory use is bounded by
# `-rss_limit_mb`/`-malloc_limit_mb`. The decoders have no `unsafe`, which is what ASan would add.
#
# Builds go to target/fuzz (one target dir shared by the three fuzz crates, separate from the
# workspace build so neither waits on the other's lock). New corpus entries go to
# <crate>/fuzz/corpus/<target> (ignored by git); the checked-in seeds in
# <crate>/fuzz/seeds/<target> are read too. Crashing inputs land in <crate>/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=60
rss_mb=2048
wanted=()
while (($#)); do
    case $1 in
        --seconds) seconds=$2; shift 2 ;;
        --rss-mb) rss_mb=$2; shift 2 ;;
        -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) wanted+=("$1"); shift ;;
    esac
done
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || { echo "--seconds needs a positive integer" >&2; exit 2; }
[[ $rss_mb =~ ^[0-9]+$ ]] || { echo "--rss-mb needs an integer" >&2; exit 2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

crates=(overlay depot api)
target_dir=$root/target/fuzz
log_dir=$target_dir/logs
mkdir -p "$log_dir"
flags=(--sanitizer none --target-dir "$target_dir")

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
    (cd "$c" && cargo fuzz build "${flags[@]}" "$t")
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
        line+=" — FAILED (exit $rc)"
        failed+=("$ct")
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written|Reproduce with' "$log" | head -20 || true
    fi
    echo "$line"
    summary+=("$line")
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "crashes, hangs or OOMs in: ${failed[*]} (inputs in <crate>/fuzz/artifacts/<target>/;" \
        "reproduce with: cd <crate> && cargo fuzz run -s none --target-dir $target_dir <target> <input>)" >&2
    exit 1
fi
