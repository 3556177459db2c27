#!/usr/bin/env bash
# Mutation testing of the modules where a wrong line loses or leaks data (mutmut 3).
# Not run by CI: a full run takes far longer than the test suite.
#
#   scripts/mutation.sh                          # every module in [tool.mutmut] only_mutate
#   scripts/mutation.sh chunking/hashing.py ...  # a subset, with only the tests that cover it
#   MUTATION_BUDGET=30m scripts/mutation.sh      # time budget (default 60m), as for timeout(1)
#   MUTATION_JOBS=2 scripts/mutation.sh          # parallel mutant runs (default: CPU count)
#   MUTATION_DIR=.mutation-b scripts/mutation.sh ...  # another scratch copy, for a second run
#   MUTATION_RERUN_SURVIVORS=1 scripts/mutation.sh ...  # check the last run's survivors again
#
# The run happens in a scratch copy (.mutation/) so that a subset can rewrite the
# [tool.mutmut] table without touching the checkout; the results are printed per module.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=$root/.venv/bin/python
budget=${MUTATION_BUDGET:-60m}
jobs=${MUTATION_JOBS:-$(nproc)}

# The tests that cover each module: a subset run collects coverage over these only.
declare -A tests_for=(
    [prefixcache/cache/block_manager.py]="tests/test_block_manager_tiers.py tests/test_block_reservation.py tests/test_block_pool.py tests/test_tiers.py"
    [prefixcache/cache/radix_cache.py]="tests/test_radix_cache.py tests/test_block_manager_tiers.py"
    [prefixcache/tiers/chunk_chains.py]="tests/test_chunk_names.py tests/test_tiers.py tests/test_kv_tier_registry.py"
    [prefixcache/tiers/tiered.py]="tests/test_tiered_cache.py tests/test_build_tiers.py tests/test_block_manager_tiers.py"
    [prefixcache/cache/pins.py]="tests/test_pin_registry.py tests/test_cache_control.py tests/test_admission_pins.py tests/test_server_cache.py tests/test_tenant_quotas.py"
    [prefixcache/apps/response_store.py]="tests/test_response_store.py"
    [server/streaming.py]="tests/test_sse_stream.py"
    [server/auth.py]="tests/test_auth_keys.py tests/test_server.py tests/test_server_cache.py tests/test_tenant_quotas.py tests/test_tenant_tiers.py tests/test_server_errors.py"
    [chunking/hashing.py]="tests/test_chunk_names.py tests/test_hashing.py tests/test_tiers.py tests/test_radix_cache.py"
)

# The `mutation` extra's requirements alone: `pip install -e .[mutation]` would also
# point a shared .venv's editable install at this checkout.
if ! "$py" -c 'import mutmut' 2>/dev/null; then
    mapfile -t reqs < <("$py" -c 'import tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print("\n".join(extras["mutation"]))')
    "$py" -m pip install -q "${reqs[@]}"
fi

modules=("$@")
for m in "${modules[@]}"; do
    [[ -n ${tests_for[$m]:-} ]] || { echo "not a configured module: $m" >&2; exit 2; }
done

work=$root/${MUTATION_DIR:-.mutation}
mkdir -p "$work"
# mutmut's own state in .mutation/mutants/ is kept so that an interrupted run resumes,
# but only for the same modules: mutmut takes a module it did not mutate last time as
# unchanged and would never mutate it.
wanted="${modules[*]:-all}"
if [[ "$(cat "$work/last-modules" 2>/dev/null)" != "$wanted" ]]; then
    rm -rf "$work/mutants"
    echo "$wanted" >"$work/last-modules"
fi
# Tracked and untracked-but-not-ignored files.
git ls-files -z --cached --others --exclude-standard \
    | tar -cf - --null -T - | tar -xf - -C "$work"

if ((${#modules[@]})); then
    tests=$(for m in "${modules[@]}"; do tr ' ' '\n' <<<"${tests_for[$m]}"; done | sort -u)
    "$py" - "$work/pyproject.toml" "${modules[*]}" "$tests" <<'EOF'
import re
import sys

path, modules, tests = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
text = open(path).read()
for key, values in (("only_mutate", modules), ("pytest_add_cli_args_test_selection", tests)):
    listed = ", ".join(f'"{v}"' for v in values)
    text = re.sub(rf"^{key} = \[.*?^\]", f"{key} = [{listed}]", text, flags=re.S | re.M)
open(path, "w").write(text)
EOF
fi

cd "$work"
export PREFIXCACHE_MUTATION=1  # tests/conftest.py: Hypothesis does not shrink failures
start=$SECONDS
status=0
# mutmut keeps a mutant's result; MUTATION_RERUN_SURVIVORS=1 checks the survivors, and the
# mutants no test reached, again (after tests were added); the others keep theirs.
names=()
if [[ -n ${MUTATION_RERUN_SURVIVORS:-} ]]; then
    mapfile -t names < <("$py" -m mutmut results 2>/dev/null | sed -n -E 's/^ *(.*): (survived|no tests)$/\1/p')
    echo "checking ${#names[@]} surviving mutants again"
fi
timeout --foreground "$budget" "$py" -m mutmut run --max-children "$jobs" "${names[@]}" || status=$?
((status == 124)) && echo "budget of $budget spent: the counts below are partial"
echo "ran for $((SECONDS - start)) s"

"$py" - <<'EOF'
"""Counts per module from mutmut's per-file state (mutants/<path>.meta)."""
import json
from collections import Counter
from pathlib import Path

from mutmut.configuration import config
from mutmut.stats import status_by_exit_code

print(f"{'module':<40} {'killed':>7} {'survived':>9} {'timeout':>8} {'other':>6} {'kill rate':>10}")
for module in config().only_mutate:
    meta = Path("mutants") / f"{module}.meta"
    if not meta.exists():
        print(f"{module:<40} not run")
        continue
    codes = json.loads(meta.read_text())["exit_code_by_key"].values()
    n = Counter(status_by_exit_code[c] for c in codes)
    done = n["killed"] + n["survived"] + n["timeout"]
    other = sum(n.values()) - done
    rate = f"{100 * (n['killed'] + n['timeout']) / done:.1f}%" if done else "-"
    print(f"{module:<40} {n['killed']:>7} {n['survived']:>9} {n['timeout']:>8} {other:>6} {rate:>10}")
print("surviving mutants: `cd .mutation && ../.venv/bin/mutmut results`; a diff: `... show NAME`")
EOF
exit "$status"
