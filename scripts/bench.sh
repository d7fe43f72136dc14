#!/usr/bin/env bash
# Benchmark: `run --state WV --dry-run` against streaming the same two
# queries with psql's binary COPY, on the sample generator at
# companies=SCALE people_per_company=3 focus_share=0.25 (at 200000: WV ~50k
# companies, ~150k people). For each scale, prints medians of RUNS paired
# repetitions (a COPY, then a run) and the run's peak RSS; then one line per
# scale.
#   RUNS=5 SCALES="200000 2000000" scripts/bench.sh     # the benchmark scale and 10x
#   COMPANIES=200000 scripts/bench.sh                   # one scale (as before)
#   LATENCY_MS=0 scripts/bench.sh                       # without the far-database round
# At the first scale it then puts a proxy adding LATENCY_MS (10) each way in
# front of PostgreSQL, a database in another region (20 ms round trip), and
# compares a full run of unchanged data (connections, claims, lease, checks,
# HEADs, audit) with the dry run, paired the same way.
# At each scale (REPORT=0 skips it) the cost of the report page: dry runs
# with `[report] enabled = false` and with the page, paired the same way.
# Then, at each scale (ALL_STATES=0 skips it), `run --all-states --dry-run`
# against streaming both whole tables with psql's binary COPY, paired the
# same way; and a full all-states run into a fresh bucket reached through a
# proxy adding S3_LATENCY_MS (50) each way, against the dry run.
set -euo pipefail
source "$(dirname "$0")/lib/services.sh"
source "$(dirname "$0")/lib/sample.sh"
cd "$OW_ROOT"
RUNS=${RUNS:-5}
SCALES=${SCALES:-${COMPANIES:-200000}}
LATENCY_MS=${LATENCY_MS:-10}
ALL_STATES=${ALL_STATES:-1}
REPORT=${REPORT:-1}
S3_LATENCY_MS=${S3_LATENCY_MS:-50}

ow_prepare
ow_build
# The Parquet writer's floor (examples/parquet_floor.rs), same profile.
(cd "$OW_ROOT" && cargo build --release --locked --quiet "${OW_FEATURES[@]}" --example parquet_floor)
ow_start_services
work=$(mktemp -d /tmp/ow-bench.XXXXXX)
OW_STARTED+=("dir:$work")
ow_export_secrets

companies_q="SELECT * FROM marketing.company_master WHERE address_state = 'WV'"
people_q="SELECT p.* FROM marketing.people_master p WHERE p.company_unique_id IN (SELECT c.company_unique_id FROM marketing.company_master c WHERE c.address_state = 'WV')"

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
now() { date +%s.%N; }

summary=() all_summary=()

# all_states_bench SCALE DB DIR CONFIG: the all-states rows of one scale.
all_states_bench() {
    local scale=$1 db=$2 dir=$3 config=$4
    local copy_times=() run_times=() run_rss=() ratios=() i t0 t1 secs kib
    "$OW_BIN" run --all-states --dry-run --config "$config" >"$dir/all-warmup.txt" 2>/dev/null
    for i in $(seq 1 "$RUNS"); do
        t0=$(now)
        ow_psql -d "$db" -c "COPY (SELECT * FROM marketing.company_master) TO STDOUT (FORMAT binary)" >/dev/null
        ow_psql -d "$db" -c "COPY (SELECT * FROM marketing.people_master) TO STDOUT (FORMAT binary)" >/dev/null
        t1=$(now)
        copy_times+=("$(echo "$t1 - $t0" | bc -l)")
        /usr/bin/time -f '%e %M' -o "$dir/all-time.txt" \
            "$OW_BIN" run --all-states --dry-run --config "$config" >"$dir/all-run.txt" 2>/dev/null
        read -r secs kib <"$dir/all-time.txt"
        run_times+=("$secs")
        run_rss+=("$kib")
        ratios+=("$(echo "$secs / ${copy_times[-1]}" | bc -l)")
    done
    local copy_med run_med rss_med rss_max paired
    copy_med=$(printf '%s\n' "${copy_times[@]}" | median)
    run_med=$(printf '%s\n' "${run_times[@]}" | median)
    rss_med=$(printf '%s\n' "${run_rss[@]}" | median)
    rss_max=$(printf '%s\n' "${run_rss[@]}" | sort -g | tail -n 1)
    paired=$(printf '%s\n' "${ratios[@]}" | median)
    echo
    echo "all states, companies=$scale ($RUNS runs each, medians)"
    head -n 2 "$dir/all-run.txt"
    printf '%-44s %8.2f s\n' "psql COPY (binary) of both whole tables" "$copy_med"
    printf '%-44s %8.2f s\n' "run --all-states --dry-run" "$run_med"
    printf '%-44s %8.2f x\n' "ratio run / COPY (median of each run's)" "$paired"
    printf '%-44s %8.0f MiB (max %.0f MiB)\n' "peak RSS of run" "$(echo "$rss_med / 1024" | bc -l)" "$(echo "$rss_max / 1024" | bc -l)"
    # No state's people can be written before the people are read whole:
    # the COPY plus the people's Parquet writing alone, on every core, is a
    # floor no design of this run goes under (docs/all-states.md).
    local writer people_s cores bound
    writer=$("$CARGO_TARGET_DIR/release/examples/parquet_floor" "$config")
    echo "$writer" | sed 's/^/  /'
    people_s=$(echo "$writer" | awk '$1 == "people" {print $4}')
    cores=$(nproc)
    bound=$(echo "($copy_med + $people_s / $cores) / $copy_med" | bc -l)
    printf '%-44s %8.2f x\n' "bound: (COPY + people's writer / $cores cores) / COPY" "$bound"
    local full_ratio=0
    if [ "$S3_LATENCY_MS" != 0 ]; then
        local s3_port s3_host s3_port_up
        s3_port=$(ow_free_port)
        s3_host=${OW_S3_ENDPOINT#http://}
        s3_port_up=${s3_host##*:}
        python3 "$OW_ROOT/scripts/lib/latency_proxy.py" "$s3_port" 127.0.0.1 "$s3_port_up" "$S3_LATENCY_MS" >"$dir/s3proxy.txt" &
        OW_STARTED+=("pid:$!")
        for _ in $(seq 1 50); do grep -q ready "$dir/s3proxy.txt" 2>/dev/null && break; sleep 0.1; done
        local dry_times=() full_times=() far_ratios=() bucket far files=0 manifests=0
        for i in $(seq 1 "$RUNS"); do
            # A fresh bucket each time: every state uploads its four files
            # and its manifest.
            bucket=bench-all-$scale-$i
            mkdir -p "$OW_S3_ROOT/$bucket"
            far=$dir/all-far.toml
            sed -e "s|^endpoint = .*|endpoint = \"http://127.0.0.1:$s3_port\"|" \
                -e "s|^bucket = .*|bucket = \"$bucket\"|" "$config" >"$far"
            t0=$(now)
            "$OW_BIN" run --all-states --dry-run --config "$far" >/dev/null 2>&1
            t1=$(now)
            "$OW_BIN" run --all-states --config "$far" >"$dir/all-full.txt" 2>/dev/null || true
            local t2
            t2=$(now)
            dry_times+=("$(echo "$t1 - $t0" | bc -l)")
            full_times+=("$(echo "$t2 - $t1" | bc -l)")
            far_ratios+=("$(echo "($t2 - $t1) / ($t1 - $t0)" | bc -l)")
            files=$(find "$OW_S3_ROOT/$bucket" -name '*.parquet' | wc -l)
            manifests=$(find "$OW_S3_ROOT/$bucket" -name '_manifest.json' | wc -l)
            rm -rf "${OW_S3_ROOT:?}/$bucket"
        done
        head -n 1 "$dir/all-full.txt"
        echo "in the last bucket: $files Parquet files, $manifests manifests"
        echo "with ${S3_LATENCY_MS} ms each way to S3, each full run into a fresh bucket"
        printf '%-44s %8.2f s\n' "run --all-states --dry-run" "$(printf '%s\n' "${dry_times[@]}" | median)"
        printf '%-44s %8.2f s\n' "run --all-states (uploads every file)" "$(printf '%s\n' "${full_times[@]}" | median)"
        full_ratio=$(printf '%s\n' "${far_ratios[@]}" | median)
        printf '%-44s %8.2f x\n' "ratio full / dry (median of each pair's)" "$full_ratio"
    fi
    all_summary+=("$(printf '%-10s %8.2f s %8.2f s %7.2fx %7.0f MiB %9.2fx %7.2fx' "$scale" "$copy_med" "$run_med" "$paired" "$(echo "$rss_med / 1024" | bc -l)" "$full_ratio" "$bound")")
}

for scale in $SCALES; do
    db=bench_$scale
    ow_load_sample "$db" "$scale" 3 0.25
    dir=$work/$scale
    config=$(ow_write_config "$dir" "$db" "bench-$scale")
    copy_times=() run_times=() run_rss=() ratios=()
    "$OW_BIN" run --state WV --dry-run --config "$config" >"$dir/warmup.txt" 2>/dev/null   # warm caches
    for i in $(seq 1 "$RUNS"); do
        t0=$(now)
        ow_psql -d "$db" -c "COPY ($companies_q) TO STDOUT (FORMAT binary)" >/dev/null
        ow_psql -d "$db" -c "COPY ($people_q) TO STDOUT (FORMAT binary)" >/dev/null
        t1=$(now)
        copy_times+=("$(echo "$t1 - $t0" | bc -l)")
        /usr/bin/time -f '%e %M' -o "$dir/time.txt" \
            "$OW_BIN" run --state WV --dry-run --config "$config" >"$dir/run.txt" 2>/dev/null
        read -r secs kib <"$dir/time.txt"
        run_times+=("$secs")
        run_rss+=("$kib")
        ratios+=("$(echo "$secs / ${copy_times[-1]}" | bc -l)")
    done

    copy_med=$(printf '%s\n' "${copy_times[@]}" | median)
    run_med=$(printf '%s\n' "${run_times[@]}" | median)
    rss_med=$(printf '%s\n' "${run_rss[@]}" | median)
    rss_max=$(printf '%s\n' "${run_rss[@]}" | sort -g | tail -n 1)
    ratio_med=$(echo "$run_med / $copy_med" | bc -l)
    ratio_paired=$(printf '%s\n' "${ratios[@]}" | median)
    echo
    echo "outreach-workbench benchmark, companies=$scale ($RUNS runs each, medians)"
    grep -E 'companies|people ' "$dir/run.txt" | head -n 2
    grep -E '^  time' "$dir/run.txt"
    printf '%-44s %8.2f s\n' "psql COPY (binary) of both queries" "$copy_med"
    printf '%-44s %8.2f s\n' "run --state WV --dry-run" "$run_med"
    printf '%-44s %8.2f x\n' "ratio run / COPY (of the medians)" "$ratio_med"
    # The machine's speed drifts between runs; each run's own ratio to the
    # COPY just before it drifts less.
    printf '%-44s %8.2f x\n' "ratio run / COPY (median of each run's)" "$ratio_paired"
    printf '%-44s %8.0f MiB (max %.0f MiB)\n' "peak RSS of run" "$(echo "$rss_med / 1024" | bc -l)" "$(echo "$rss_max / 1024" | bc -l)"
    summary+=("$(printf '%-10s %8.2f s %8.2f s %7.2fx %7.2fx %7.0f MiB' "$scale" "$copy_med" "$run_med" "$ratio_med" "$ratio_paired" "$(echo "$rss_med / 1024" | bc -l)")")
    if [ "$REPORT" != 0 ]; then
        # Pairs of runs without and with the page, which goes first taking
        # turns; each pair's own ratio. And the page's own time, as the run
        # measures it (its samples and the page: `report` in the summary).
        off_times=() on_times=() page_ratios=() page_secs=()
        for i in $(seq 1 "$RUNS"); do
            for which in $( ((i % 2)) && echo "off on" || echo "on off"); do
                t0=$(now)
                if [ "$which" = off ]; then
                    OUTREACH_REPORT__ENABLED=false "$OW_BIN" run --state WV --dry-run --config "$config" >/dev/null 2>&1
                    off=$(echo "$(now) - $t0" | bc -l)
                else
                    "$OW_BIN" run --state WV --dry-run --config "$config" >"$dir/page.txt" 2>/dev/null
                    on=$(echo "$(now) - $t0" | bc -l)
                fi
            done
            off_times+=("$off")
            on_times+=("$on")
            page_ratios+=("$(echo "$on / $off" | bc -l)")
            page_secs+=("$(sed -n 's/^  time .*report \([0-9.]*\)s.*/\1/p' "$dir/page.txt")")
        done
        page_ratio=$(printf '%s\n' "${page_ratios[@]}" | median)
        echo
        echo "the report page, companies=$scale ($RUNS pairs, medians)"
        grep -E '^  report page' "$dir/page.txt" | sed 's/^  //'
        printf '%-44s %8.2f s\n' "run --state WV --dry-run, [report] off" "$(printf '%s\n' "${off_times[@]}" | median)"
        printf '%-44s %8.2f s\n' "run --state WV --dry-run, with the page" "$(printf '%s\n' "${on_times[@]}" | median)"
        printf '%-44s %8.3f x (%+.1f %%)\n' "ratio with / without (median of each pair's)" "$page_ratio" "$(echo "($page_ratio - 1) * 100" | bc -l)"
        printf '%-44s %8.3f s\n' "the page's own time (samples + page)" "$(printf '%s\n' "${page_secs[@]}" | median)"
    fi
    if [ "$LATENCY_MS" != 0 ] && [ "$scale" = "${SCALES%% *}" ]; then
        far_port=$(ow_free_port)
        python3 "$OW_ROOT/scripts/lib/latency_proxy.py" "$far_port" "$OW_PG_HOST" "$OW_PG_PORT" "$LATENCY_MS" >"$dir/proxy.txt" &
        OW_STARTED+=("pid:$!")
        for _ in $(seq 1 50); do grep -q ready "$dir/proxy.txt" 2>/dev/null && break; sleep 0.1; done
        far=$dir/far.toml
        sed "s/^port = $OW_PG_PORT\$/port = $far_port/" "$config" >"$far"
        "$OW_BIN" run --state WV --config "$far" >"$dir/first.txt" 2>/dev/null   # publishes; later runs change nothing
        dry_times=() full_times=() far_ratios=()
        for i in $(seq 1 "$RUNS"); do
            t0=$(now)
            "$OW_BIN" run --state WV --dry-run --config "$far" >/dev/null 2>&1
            t1=$(now)
            "$OW_BIN" run --state WV --config "$far" >"$dir/full.txt" 2>/dev/null
            t2=$(now)
            dry_times+=("$(echo "$t1 - $t0" | bc -l)")
            full_times+=("$(echo "$t2 - $t1" | bc -l)")
            far_ratios+=("$(echo "($t2 - $t1) / ($t1 - $t0)" | bc -l)")
        done
        grep -q 'uploaded 0' "$dir/full.txt" || grep -E 'uploaded|skipped' "$dir/full.txt" >&2
        echo
        echo "with ${LATENCY_MS} ms each way to PostgreSQL (a $((2 * LATENCY_MS)) ms round trip), companies=$scale"
        printf '%-44s %8.2f s\n' "run --state WV --dry-run" "$(printf '%s\n' "${dry_times[@]}" | median)"
        printf '%-44s %8.2f s\n' "run --state WV (unchanged data, all skipped)" "$(printf '%s\n' "${full_times[@]}" | median)"
        printf '%-44s %8.2f x\n' "ratio full / dry (median of each pair's)" "$(printf '%s\n' "${far_ratios[@]}" | median)"
    fi
    if [ "$ALL_STATES" != 0 ]; then
        all_states_bench "$scale" "$db" "$dir" "$config"
    fi
    # Each scale's database and workbench go before the next is loaded.
    ow_psql -d postgres -c "DROP DATABASE $db" >/dev/null
    rm -rf "$dir"
done

echo
printf '%-10s %10s %10s %8s %8s %11s\n' "companies" "COPY" "run" "ratio" "paired" "peak RSS"
printf '%s\n' "${summary[@]}"
if [ ${#all_summary[@]} -gt 0 ]; then
    echo
    echo "all states (run --all-states --dry-run against COPY of both whole tables; full/dry with ${S3_LATENCY_MS} ms to S3)"
    printf '%-10s %10s %10s %8s %11s %10s %8s\n' "companies" "COPY" "run" "paired" "peak RSS" "full/dry" "bound"
    printf '%s\n' "${all_summary[@]}"
fi
