#!/usr/bin/env bash
# GPU check (issues 9 and 16): first the vLLM tests (`pytest -m vllm`, tests/test_vllm_engine.py: the same
# real-engine tests CI runs on vLLM's CPU build, here on CUDA), then GRPO with the colocated vLLM engine
# under FSDP on every visible GPU (Lightning's launcher, trainer.devices = their count), on a scaled-up
# tiny model (random weights, hidden 512, 8 layers), 5 steps. The run
# goes through the weight sync before each rollout (FSDP-gathered weights reloaded into vLLM in place) and
# the FSDP export at the end. Prints the tests' outcome, step time, rollout tokens/s and peak GPU memory as
# a Markdown section for benchmarks/RESULTS.md.
#
#   bash scripts/gpu_check_grpo_fsdp_vllm.sh --fetch-wheels   # once, on a machine WITH internet: writes .whl/
#   bash scripts/gpu_check_grpo_fsdp_vllm.sh                  # on the GPU machine (no internet); about 5 min
#   bash scripts/gpu_check_grpo_fsdp_vllm.sh --compose        # anywhere: check the Hydra overrides compose
#
# The GPU machine has no internet: the project's pure-Python dependencies that its image lacks (hydra-core,
# omegaconf, antlr4, math-verify) come from .whl/ (git-ignored; the device tool carries it). vLLM with
# its own CUDA torch is far too large to carry, so unless vllm is importable there (or its wheels are in
# .whl/) the script says so and, with ROLLOUT_FALLBACK=hf (the default), runs the same job with rollout=hf
# (FSDP training + export measured, no vLLM) and labels the results accordingly. ROLLOUT_FALLBACK=none
# stops instead.
#
# Results go to $OUT (or ./gpu_check_out): results.md, summary.json, train.log, gpu_mem.csv.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0
        pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0)  # pytest: the vLLM tests

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  PY=$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)
  mkdir -p .whl
  grep -qx '/.whl/' .gitignore 2>/dev/null || echo "warning: .whl/ is not in .gitignore" >&2
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl "${WHEELS[@]}" || exit 1
  # antlr4 4.9.3 (omegaconf's pin) is published as a source archive only: build its pure-Python wheel.
  "$PY" -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1
  ls -la .whl
  exit 0
fi

# The job: 5 GRPO steps, 32 prompts x G=8 = 256 completions of up to 256 tokens per step.
overrides() {  # $1: vllm | hf; further arguments are appended
  local rollout=$1; shift
  OVERRIDES=(
    experiment=grpo_math model=tiny data=synthetic "rollout=$rollout" strategy=fsdp2 trainer=fsdp2
    "trainer.devices=${DEVICES:-1}" trainer.max_steps=5 trainer.log_every_n_steps=1 trainer.limit_val_batches=0
    trainer.enable_progress_bar=false name=grpo_fsdp_gpu_check callbacks.model_checkpoint=null
    model.tiny.hidden_size=512 model.tiny.intermediate_size=1536 model.tiny.num_hidden_layers=8
    model.tiny.num_attention_heads=8 model.tiny.num_key_value_heads=8 model.tiny.max_position_embeddings=2048
    data.batch_size=32 data.num_workers=2 module.num_generations=8 module.micro_batch_size=32
    module.sampling.max_new_tokens=256 module.val_sampling.max_new_tokens=64 module.optimizer.lr=1e-5
  )
  if [[ $rollout == vllm ]]; then
    # Sleep mode is CUDA-only: this run is where TRL's order (wake weights, sync, wake KV cache, generate,
    # sleep level 2) meets a real engine; the sampler correction's sampling/* figures land in train.log.
    OVERRIDES+=(rollout.gpu_memory_utilization=0.25 rollout.max_model_len=1024 rollout.dtype=auto
                rollout.enable_sleep_mode=true +rollout.enforce_eager=true)
  else
    OVERRIDES+=(rollout.batch_size=256)
  fi
  OVERRIDES+=("$@")
}

if [[ "${1:-}" == "--compose" ]]; then
  # Check that both variants' overrides compose (CPU is enough): prints each job config's head.
  PY=$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)
  for rollout in vllm hf; do
    overrides "$rollout"
    echo "== rollout=$rollout"
    "$PY" train.py --cfg job "${OVERRIDES[@]}" | grep -A9 '^rollout:' || exit 1
  done
  exit 0
fi

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
WORK=/tmp/gpu_check
rm -rf "$WORK" && mkdir -p "$WORK"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export SELFBUDGET_CACHE="$WORK/cache"
# Launched as README says: Lightning's launcher, one process per visible GPU, no ranks set by hand (train()
# writes the variables vLLM's external launcher reads from the Trainer's own ranks).
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
started=$(date +%s)

# 1. Dependencies, from .whl/ only (no index is reachable).
if compgen -G ".whl/*.whl" >/dev/null; then
  if compgen -G ".whl/vllm-*.whl" >/dev/null; then
    echo "== installing .[vllm] from .whl/ (vllm brings its own CUDA torch)"
    "$PY" -m pip install -q --no-index --find-links .whl --no-build-isolation -e '.[vllm]' \
      || echo "!! pip install -e .[vllm] from .whl/ failed"
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if ! "$PY" -c "import hydra, omegaconf, lightning, peft, transformers, tensorboard, math_verify" 2>"$OUT/import_error.txt"; then
  echo "!! the project's dependencies are not importable here (see import_error.txt):"
  tail -1 "$OUT/import_error.txt"
  echo "!! run 'bash scripts/gpu_check_grpo_fsdp_vllm.sh --fetch-wheels' on a machine with internet and carry .whl"
  exit 2
fi

# 2. vLLM, or a clearly labelled fallback.
ROLLOUT=vllm
if VLLM_VERSION=$("$PY" -c "import vllm; print(vllm.__version__)" 2>"$OUT/vllm_import_error.txt"); then
  echo "== vllm $VLLM_VERSION"
else
  VLLM_VERSION=none
  echo "!! VLLM UNAVAILABLE: 'import vllm' fails on this machine ($(tail -1 "$OUT/vllm_import_error.txt"))."
  echo "!! It has no internet and vllm (with its CUDA torch) is too large to carry, so rollout=vllm cannot run here."
  if [[ "${ROLLOUT_FALLBACK:-hf}" != "hf" ]]; then exit 3; fi
  echo "!! FALLBACK: the same job with rollout=hf (FSDP training + export only; NOT a vLLM measurement)."
  ROLLOUT=hf
fi
"$PY" -c "import torch; print('== torch', torch.__version__, torch.cuda.get_device_name(0))"
DEVICES=${DEVICES:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
echo "== trainer.devices=$DEVICES (every visible GPU)"

# 2b. The vLLM tests on CUDA (the engine on the GPU, the HF reference on the CPU, both float32).
TESTS_RC=skipped
if [[ $ROLLOUT == vllm ]]; then
  echo "== python -m pytest -m vllm tests/test_vllm_engine.py"
  CI=true timeout "${TESTS_TIMEOUT:-600}" "$PY" -m pytest -m vllm -q -p no:cacheprovider tests/test_vllm_engine.py \
    2>&1 | tee "$OUT/vllm_tests.log"
  TESTS_RC=${PIPESTATUS[0]}
  echo "== vllm tests exit code $TESTS_RC: $(grep -E '[0-9]+ (passed|failed)' "$OUT/vllm_tests.log" | tail -1)"
fi

# 3. The run: 5 GRPO steps, 32 prompts x G=8 = 256 completions of up to 256 tokens per step.
overrides "$ROLLOUT" "paths.log_dir=$WORK/logs"
echo "== python train.py ${OVERRIDES[*]}"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$OUT/gpu_mem.csv" 2>/dev/null &
SMI=$!
timeout "${TRAIN_TIMEOUT:-360}" "$PY" train.py "${OVERRIDES[@]}" 2>&1 | tee "$OUT/train.log"
RC=${PIPESTATUS[0]}
kill "$SMI" 2>/dev/null
echo "== train.py exit code $RC after $(( $(date +%s) - started )) s"

# 4. Numbers from the TensorBoard scalars (wall time per logged step) and nvidia-smi.
DEVICES=$DEVICES ROLLOUT=$ROLLOUT VLLM_VERSION=$VLLM_VERSION RC=$RC TESTS_RC=$TESTS_RC WORK=$WORK OUT=$OUT "$PY" - <<'EOF'
import glob, json, os, statistics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

work, out = os.environ["WORK"], os.environ["OUT"]
events = sorted(glob.glob(f"{work}/logs/**/events.out.tfevents.*", recursive=True))
scalars = {}
if events:
    acc = EventAccumulator(os.path.dirname(events[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
step_tag = max((t for t in scalars if t in ("rewards/mean", "train/loss")), key=lambda t: len(scalars[t]), default=None)
rows = sorted(scalars.get(step_tag, []))
step_s = [b[1] - a[1] for a, b in zip(rows, rows[1:])]  # wall time between consecutive steps' logs


def median_after_first(tag):
    values = [v for _, _, v in sorted(scalars.get(tag, []))][1:]  # step 0 includes warm-up
    return statistics.median(values) if values else float("nan")


mem = [int(x) for x in open(f"{out}/gpu_mem.csv").read().split() if x.strip().isdigit()] if os.path.exists(f"{out}/gpu_mem.csv") else []
exported = any("exported model to" in line for line in open(f"{out}/train.log", errors="replace"))
summary = {
    "rollout": os.environ["ROLLOUT"], "vllm": os.environ["VLLM_VERSION"], "exit_code": int(os.environ["RC"]),
    "vllm_tests_exit_code": os.environ["TESTS_RC"],
    "steps_logged": len(rows), "step_seconds": step_s,
    # Step 1 has no start mark and step 2 still warms up: the median of steps 3-5.
    "median_step_s": statistics.median(step_s[1:] or step_s) if step_s else float("nan"),
    "rollout_tokens_per_s": median_after_first("rollout/tokens_per_s"),
    "train_tokens_per_s": median_after_first("train/tokens_per_s"),
    "completion_mean_length": median_after_first("completions/mean_length"),
    "peak_gpu_mem_mib": max(mem) if mem else None, "idle_gpu_mem_mib": mem[0] if mem else None,
    "export_written": exported,
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
label = "vLLM" if summary["rollout"] == "vllm" else "HF generate (FALLBACK: vllm unavailable)"
peak = f"{summary['peak_gpu_mem_mib'] / 1024:.1f} GiB" if mem else "n/a"
md = f"""## GRPO under FSDP on one H200, rollouts by {label} (`scripts/gpu_check_grpo_fsdp_vllm.sh`)

Setup: the tiny Qwen2 scaled up (hidden 512, 8 layers, 8 heads, random weights, fp32 master weights,
bf16 FSDP mixed precision), synthetic sums, 32 prompts x G = 8 = 256 completions of up to 256 new tokens
per step, micro-batch 32, 5 steps, `strategy=fsdp2 trainer=fsdp2 trainer.devices={os.environ['DEVICES']}` (Lightning's launcher), rollout={summary['rollout']}
(vllm {summary['vllm']}{', gpu_memory_utilization 0.25, enforce_eager, bf16' if summary['rollout'] == 'vllm' else ''}).
{'Weights reloaded into the engine before each rollout' if summary['rollout'] == 'vllm' else 'No weight sync (HF generate shares the policy)'}; FSDP export at the end: {'written' if exported else 'NOT written'}.
vLLM tests (`pytest -m vllm`) exit code {summary['vllm_tests_exit_code']}; train.py exit code {summary['exit_code']}; {len(rows)} steps logged; step seconds {', '.join(f'{x:.2f}' for x in step_s)}.

| what | value |
|---|---|
| seconds per GRPO step (median of steps 3-5: wall time between consecutive step logs) | {summary['median_step_s']:.2f} |
| rollout tokens/s (median, steps 2-5) | {summary['rollout_tokens_per_s']:,.0f} |
| policy-update tokens/s (median, steps 2-5) | {summary['train_tokens_per_s']:,.0f} |
| mean completion length (tokens) | {summary['completion_mean_length']:.0f} |
| peak GPU memory (nvidia-smi, whole process{', incl. vLLM reservation' if summary['rollout'] == 'vllm' else ''}) | {peak} |
"""
open(f"{out}/results.md", "w").write(md)
print(md)
print(json.dumps(summary))
EOF
[[ $TESTS_RC == skipped || $TESTS_RC == 0 ]] || exit "$TESTS_RC"
exit "$RC"
