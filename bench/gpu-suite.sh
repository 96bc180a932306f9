#!/usr/bin/env bash
# The GPU benchmark and correctness suite, run on the GPU machine from the project root after
# `scripts/cuda/build.sh` packed the binary into .gpu/ (and, for the peer stages,
# `bench/peers/fetch-llamacpp.sh` and the PEFT wheel in .gpu/wheels). Stages, run in the order
# given (default: parity batching gen serve train pytorch):
#   parity     the GPU correctness tests (tests/cuda_parity.rs, packed by scripts/cuda/build.sh): CPU/GPU
#              logits, fused decode at 1-8 rows, dequantization, dense prefill, training kernels, gradients
#   q4km       llama.cpp built from source, a random Mistral-7B converted and quantized to Q4_K_M by
#              llama.cpp's own tools ($Q4KM); later stages use that file where they can
#   batching   answers alone vs together through the engine with a LoRA adapter, on the Q4_K_M
#              file (every answer must be the same), and `bench generate` equality bare and r=16,
#              then bare with each other 1-2 row kernel choice (`--row-kernels`), each prompt
#              kernel from 9 tokens (`--prompt-kernel`) and the composed prompt attention
#              (`--prompt-attention composed`, the fused kernel's reference)
#   llamacpp   llama-bench on the same Q4_K_M file (pp512, tg128, pp100+tg1, flash attention)
#   ptx        each consumer-card build (.gpu/*-sm86.xz, -sm89: `CUDA_COMPUTE_CAP=86
#              scripts/cuda/build.sh`) on this card through PTX JIT: its GPU tests where packed,
#              the same greedy answer as the default build on $Q4KM, and `bench generate` of every
#              build ($Q4KM, else the random Mistral-7B Q4_K_M mix)
#   gen        `bench generate` on the random Mistral-7B shape, bare and with a rank-16 LoRA, and
#              the Q4_K_M mix; every run also times candle's ops in the same process
#   ab         every packed build in .gpu (freeski-bot, and freeski-bot-<name>: a build's
#              .gpu/freeski-bot.xz copied under that name, e.g. the previous commit's beside a
#              change; consumer-card builds left out) in turns, two rounds: prefill, time to first
#              token and batch-1 decode on the random Mistral-7B Q4_K_M mix (no peer file needed)
#   ncu        kernel time per launch of one fused r=16 decode token, and ncu's sections for the
#              gate|up and down matvecs
#   ncufile    kernel time per launch of one fused bare decode token on the Q4_K_M file ($Q4KM)
#   serve      `bench serve-train` on the Q4_K_M mix with 7.0 GB left free (without the cap too
#              where that fails)
#   servekto   the same with the preference objective (`--objective kto`)
#   apiload    `freeski-bot serve` and llama.cpp's llama-server (if built: `llamacpp.sh build`) on
#              the same Q4_K_M file ($Q4KM, else the random 7B shape for serve alone), each driven by
#              bench/serve_load.py with 1, 8 and 32 concurrent streaming clients: aggregate
#              tokens/s, p50/p95 time to first token
#   train      `bench train` on llama.cpp's Q4_K_M mix (r=16, and r=2, the prototype's rank), then
#              again with 6.5 GB left free, and beside it at the same shapes the prototype's QLoRA stack
#              (PEFT + bitsandbytes NF4, paged AdamW 8-bit; needs .gpu/peers/bitsandbytes.tar.gz
#              from `bench/peers/fetch-qlora.sh`) and PyTorch + PEFT on a bf16 base (r=16), each
#              peer twice, then ours once more
#   trainprof  GPU time by kernel of one `bench train` step (nsys, or ncu without it)
#   genprof    the same for one 512-token prefill, for 16 batch-1 decode tokens and for 15 steps
#              of 8 streams decoding together, on $Q4KM (else the random Mistral-7B Q4_K_M mix);
#              GENPROF_PARTS=prefill (decode, batched) for one of them alone
#   torchprof  the same for one PyTorch + PEFT step (torch.profiler)
#   pytorch    PyTorch bf16 `generate`, bare and with a PEFT LoRA of rank 16
# Usage:  bash bench/gpu-suite.sh [stage ...]
# The files each stage writes are packed into one $OUT/suite-<time>.tar.xz when the run ends
# (also when a time limit stops it), since the GPU machine sends back only a few files a call.
# The H100 figures beside llama.cpp come from one device call of about 8 minutes
# (the peer's build waits on a lock, so the q4km stage never starts a second one; the random
# checkpoint's conversion needs no build and runs beside it; `ab` wants the previous commit's
# binary packed as .gpu/freeski-bot-prev.xz):
#   bash bench/peers/llamacpp.sh build >/tmp/llama-build.log 2>&1 &
#   bash bench/peers/llamacpp.sh mistral-f16 >/tmp/llama-f16.log 2>&1 &
#   bash bench/gpu-suite.sh parity ab; wait; bash bench/gpu-suite.sh q4km llamacpp
#   source .gpu/activate; for r in 0 16; do freeski-bot bench generate --model \
#     /tmp/llamacpp/mistral-7b-random.Q4_K_M.gguf --device cuda:0 --lora-rank $r --compare false; done
#   python3 bench/pytorch_generate.py --decode-tokens 16
# A second call, chained within 30 s while the machine is warm, can run `batching ncufile
# genprof ptx` on the same file.
set -uo pipefail
source .gpu/activate
DEST=${OUT:-/tmp/out}; mkdir -p "$DEST"
OUT=$(mktemp -d /tmp/gpu-suite.XXXXXX)
pack() { tar -C "$OUT" -cJf "$DEST/suite-$(date +%H%M%S).tar.xz" . 2>/dev/null; }
trap pack EXIT
trap 'exit 143' TERM INT
F='^ *[0-9]*: <unknown>|^\s*$|INFO'
# PEFT comes with the GPU machine's image; where it does not, its wheel travels in .gpu/wheels
# (download it first: python3 -m pip download --no-deps --only-binary=:all: -d .gpu/wheels peft==0.21.2).
PYDIR=/tmp/peft-lib
peft() { [ -d "$PYDIR/peft" ] || pip install -q --no-deps --target "$PYDIR" .gpu/wheels/peft-*.whl >/dev/null 2>&1; }
NCU=/usr/local/cuda/bin/ncu
# One fused decode token: 1 embedding + 32 layers × 10 + final prepare + head = 323 launches.
PER_TOKEN=323
A="bench generate --random mistral-7b --device cuda:0 --lora-rank 16 --repeats 1 --streams 0 --compare false --prompt-tokens 64 --ttft-tokens 16 --decode-tokens 16"
export WORK=${WORK:-/tmp/llamacpp}
Q4KM=$WORK/mistral-7b-random.Q4_K_M.gguf

stage_q4km() {
  [ -x "$WORK/build/bin/llama-quantize" ] || bash bench/peers/llamacpp.sh build 2>&1 | tail -3
  bash bench/peers/llamacpp.sh mistral-q4km 2>&1 | tail -3
  ls -la "$Q4KM" | tee "$OUT/q4km.txt"
}
stage_batching() {
  local m=(--model "$Q4KM"); [ -f "$Q4KM" ] || m=()
  for r in 16 0; do
    freeski-bot bench batching "${m[@]}" --device cuda:0 --lora-rank $r 2>&1 | grep -Ev "$F" | tee "$OUT/batching-r$r.txt"
  done
  if [ -f "$Q4KM" ]; then
    for r in 0 16; do
      freeski-bot bench generate --model "$Q4KM" --device cuda:0 --lora-rank $r --compare false 2>&1 | grep -Ev "$F" | tee "$OUT/gen-q4km-file-r$r.txt"
    done
    for k in tensor-cores fastest; do
      freeski-bot bench generate --model "$Q4KM" --device cuda:0 --lora-rank 0 --compare false --row-kernels $k 2>&1 | grep -E "decode|prefill|path" | tee "$OUT/gen-q4km-file-$k.txt"
    done
    # Both prompt kernels from 9 tokens, so the 100-token time to first token takes them too;
    # then the fused attention kernel.
    for k in dense-bf16 int8-mma f16-mma; do
      freeski-bot bench generate --model "$Q4KM" --device cuda:0 --lora-rank 0 --compare false --streams 0 --prompt-kernel $k --prompt-rows 9 2>&1 | grep -E "prefill|time to first|path" | tee "$OUT/gen-q4km-file-prompt-$k.txt"
    done
    freeski-bot bench generate --model "$Q4KM" --device cuda:0 --lora-rank 0 --compare false --streams 0 --prompt-attention fused 2>&1 | grep -E "prefill|time to first|path" | tee "$OUT/gen-q4km-file-attention-fused.txt"
  fi
}
stage_llamacpp() {
  bash bench/peers/llamacpp.sh bench "$Q4KM" 2>&1 | grep -E "^\|" | tee "$OUT/llamacpp-bench.txt"
}
stage_parity() { cuda_parity --ignored --nocapture --test-threads 1 2>&1 | grep -Ev "$F" | tee "$OUT/parity.txt"; }
# Each consumer-card build (`CUDA_COMPUTE_CAP=86 scripts/cuda/build.sh`: PTX for compute_86, which
# the driver compiles for this card at load): its GPU correctness tests, a greedy answer on the
# Q4_K_M file next to the default build's (must be the same text), and `bench generate` of each.
stage_ptx() {
  local m=(--model "$Q4KM") b c q="How do I land a switch 900 in the park?"
  [ -f "$Q4KM" ] || m=(--random mistral-7b --quant q4k-m)
  [ -f "$Q4KM" ] && freeski-bot ask --model "$Q4KM" --device cuda:0 --temperature 0 --max-new-tokens 64 "$q" 2>/dev/null > "$OUT/ask-freeski-bot.txt"
  for b in /tmp/gpu-bin/freeski-bot-sm*; do
    [ -x "$b" ] || continue
    c=${b##*-}
    command -v "cuda_parity-$c" >/dev/null && "cuda_parity-$c" --ignored --nocapture --test-threads 1 2>&1 | grep -Ev "$F" | tee "$OUT/parity-$c.txt"
    if [ -f "$Q4KM" ]; then
      "$b" ask --model "$Q4KM" --device cuda:0 --temperature 0 --max-new-tokens 64 "$q" 2>/dev/null > "$OUT/ask-$c.txt"
      cmp "$OUT/ask-freeski-bot.txt" "$OUT/ask-$c.txt" && echo "greedy answers of the sm_90 and $c builds: identical ($(wc -c < "$OUT/ask-$c.txt") bytes)" | tee -a "$OUT/ptx-same.txt"
    fi
    "$b" bench generate "${m[@]}" --device cuda:0 --compare false --streams 8 --lora-rank 0 2>&1 | grep -Ev "$F" | tee "$OUT/gen-ptx-$c.txt"
  done
  freeski-bot bench generate "${m[@]}" --device cuda:0 --compare false --streams 8 --lora-rank 0 2>&1 | grep -Ev "$F" | tee "$OUT/gen-ptx-sm90.txt"
}
stage_gen() {
  for r in 0 16; do
    freeski-bot bench generate --random mistral-7b --device cuda:0 --lora-rank $r --json "$OUT/gen-r$r.json" 2>&1 | grep -Ev "$F" | tee "$OUT/gen-r$r.txt"
  done
  freeski-bot bench generate --random mistral-7b --quant q4k-m --device cuda:0 --lora-rank 16 --repeats 1 2>&1 | grep -Ev "$F" | tee "$OUT/gen-q4km-r16.txt"
  # The same fused step launched kernel by kernel instead of replayed as a CUDA graph.
  freeski-bot bench generate --random mistral-7b --device cuda:0 --lora-rank 16 --graphs false --compare false --streams 8 2>&1 | grep -E "decode|prefill" | tee "$OUT/gen-r16-nographs.txt"
}
stage_ab() {
  local b round bins=()
  for b in /tmp/gpu-bin/freeski-bot /tmp/gpu-bin/freeski-bot-*; do [ -x "$b" ] && [[ "$b" != *-sm[0-9]* ]] && bins+=("$(basename "$b")"); done
  for round in 1 2; do
    for b in "${bins[@]}"; do
      echo "-- $b (round $round)" | tee -a "$OUT/ab.txt"
      $b bench generate --random mistral-7b --quant q4k-m --device cuda:0 --lora-rank 0 --compare false --streams 0 \
        --decode-tokens 32 2>&1 | grep -E "prefill|time to first|decode batch" | tee -a "$OUT/ab.txt"
    done
  done
}
stage_ncu() {
  # The card's own clocks and caches (ncu's default of locked base clocks and flushed caches
  # inflates every kernel). The first 4 tokens are skipped.
  $NCU --cache-control none --clock-control none --csv --metrics gpu__time_duration.sum \
    -k 'regex:^(mv[qd]?_|attn_|rope_|prep_|embed)' --launch-skip $((4 * PER_TOKEN)) --launch-count $PER_TOKEN \
    freeski-bot $A > "$OUT/ncu.csv" 2>/dev/null && python3 bench/ncu_summary.py "$OUT/ncu.csv" 12 | tee "$OUT/ncu.txt"
  # Matvec launches per token: 4 a layer + the head; skip 4 tokens, then layer 0's gate|up and down.
  $NCU --cache-control none --clock-control none --section SpeedOfLight --section Occupancy \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats \
    -k 'regex:^mv_' --launch-skip $((4 * 129 + 2)) --launch-count 2 \
    freeski-bot $A 2>/dev/null | grep -v "^==PROF==" > "$OUT/ncu-detail.txt"
  # The same for 8 streams (the batched step's gate|up and down).
  $NCU --cache-control none --clock-control none --section SpeedOfLight --section Occupancy \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section ComputeWorkloadAnalysis \
    -k 'regex:^mvq?_.*_b8' --launch-skip $((4 * 129 + 2)) --launch-count 2 \
    freeski-bot ${A/--streams 0/--streams 8} 2>/dev/null | grep -v "^==PROF==" > "$OUT/ncu-detail-b8.txt"
  # One batched token's 129 matvec launches (the other kernels also run for the one-at-a-time
  # reference decode, so only the matvecs are told apart by name).
  $NCU --cache-control none --clock-control none --csv --metrics gpu__time_duration.sum \
    -k 'regex:^mvq?_.*_b8' --launch-skip $((4 * 129)) --launch-count 129 \
    freeski-bot ${A/--streams 0/--streams 8} > "$OUT/ncu-b8.csv" 2>/dev/null; python3 bench/ncu_summary.py "$OUT/ncu-b8.csv" 5 | tee "$OUT/ncu-b8.txt"
  grep -hE "mv_|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Ipc A|Warp Cycles Per Issued" "$OUT/ncu-detail.txt" "$OUT/ncu-detail-b8.txt" | head -60
}
stage_ncufile() {
  # Bare, one row; the first 4 tokens are skipped. The launches a token are the step's own count
  # (the Q4_K_M mix's 6-bit v tensors take a launch of their own beside q|k).
  local g=(bench generate --model "$Q4KM" --device cuda:0 --lora-rank 0 --repeats 1 --streams 0 --compare false --prompt-tokens 64 --ttft-tokens 16)
  local per; per=$(freeski-bot "${g[@]}" --decode-tokens 4 2>&1 | grep -oE "[0-9]+ kernel launches per token" | grep -oE "^[0-9]+")
  $NCU --cache-control none --clock-control none --csv --metrics gpu__time_duration.sum \
    -k 'regex:^(mv[qd]?_|attn_|rope_|prep_|embed)' --launch-skip $((4 * per)) --launch-count "$per" \
    freeski-bot "${g[@]}" --decode-tokens 16 > "$OUT/ncu-file.csv" 2>/dev/null
  python3 bench/ncu_summary.py "$OUT/ncu-file.csv" 12 | tee "$OUT/ncu-file.txt"
}
stage_serve() {
  local ok S=(bench serve-train --random mistral-7b --quant q4k-m --device cuda:0 --questions 5 --new-tokens 64)
  freeski-bot "${S[@]}" --leave-free-gb 7.0 >"$OUT/serve-train.log" 2>&1 && ok=1 || ok=0
  grep -Ev "$F" "$OUT/serve-train.log" | tail -11 | tee "$OUT/serve-train.txt"
  # Where it does not fit, the same run without the cap tells by how much.
  [ $ok = 1 ] || freeski-bot "${S[@]}" 2>&1 | grep -Ev "$F" | tail -11 | tee "$OUT/serve-train-nocap.txt"
}
# Wait until an HTTP server answers GET $1 (model loading takes a while), at most 10 minutes.
http_get() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1" 2>/dev/null; }
wait_http() { for _ in $(seq 600); do http_get "$1" >/dev/null && return 0; sleep 1; done; echo "no answer from $1" >&2; return 1; }
stage_apiload() {
  local clients=${LOAD_CLIENTS:-1,8,32} req=${LOAD_REQUESTS:-4} tok=${LOAD_MAX_TOKENS:-128} pid
  local m=(--model "$Q4KM"); [ -f "$Q4KM" ] || { echo "no $Q4KM (run the q4km stage): freeski serve on the random 7B shape is not possible, skipping"; return; }
  rm -f "$OUT/apiload.json"
  # max_batch 8: the rows a batch decodes on the fused kernels with unchanged answers.
  FREESKI__SERVE__MODEL_NAME=q4km FREESKI__SERVE__QUEUE_CAPACITY=256 FREESKI__SERVE__MAX_BATCH=8 FREESKI__GENERATION__MAX_NEW_TOKENS=$tok \
    freeski-bot serve "${m[@]}" --device cuda:0 --listen 127.0.0.1:8011 >"$OUT/apiload-serve.log" 2>&1 & pid=$!
  if wait_http http://127.0.0.1:8011/health; then
    python3 bench/serve_load.py --url http://127.0.0.1:8011 --model q4km --clients "$clients" --requests "$req" --max-tokens "$tok" --label freeski-serve --json "$OUT/apiload.json" | tee "$OUT/apiload-freeski.txt"
    http_get http://127.0.0.1:8011/metrics | grep -E "^freeski_(completions|generated|time_to_first_token_seconds_(sum|count))" > "$OUT/apiload-metrics.txt"
  fi
  kill -TERM $pid; wait $pid
  if [ -x "$WORK/build/bin/llama-server" ]; then
    # 8 slots with continuous batching, the whole context split between them, flash attention.
    "$WORK/build/bin/llama-server" -m "$Q4KM" -ngl 99 -fa on -np 8 -c 32768 --cont-batching --host 127.0.0.1 --port 8012 >"$OUT/apiload-llamacpp.log" 2>&1 & pid=$!
    if wait_http http://127.0.0.1:8012/health; then
      python3 bench/serve_load.py --url http://127.0.0.1:8012 --model q4km --clients "$clients" --requests "$req" --max-tokens "$tok" --label llama-server --json "$OUT/apiload.json" | tee "$OUT/apiload-llamacpp.txt"
    fi
    kill -TERM $pid; wait $pid
  else
    echo "llama-server not built (bash bench/peers/llamacpp.sh build): freeski serve only"
  fi
}
stage_servekto() {
  freeski-bot bench serve-train --random mistral-7b --device cuda:0 --questions 5 --new-tokens 64 --leave-free-gb 8.0 --objective kto 2>&1 | grep -Ev "$F" | tail -11 | tee "$OUT/serve-train-kto.txt"
}
stage_train() {
  # The Python peers are bound by the host's launch rate, which drifts between machines and
  # minutes: each peer runs twice (8 steps after a warm-up each), and ours again after them.
  local r i
  local T=(bench train --random mistral-7b --quant q4k-m --seq 512 --batch 2 --device cuda:0)
  for r in 16 2; do
    # Time and memory by part without a cap, then whether it completes with 6.5 GB left free.
    freeski-bot "${T[@]}" --rank $r --json "$OUT/train-r$r.json" 2>&1 | grep -Ev "$F" | tee "$OUT/train-r$r.txt"
    freeski-bot "${T[@]}" --rank $r --steps 2 --leave-free-gb 6.5 2>&1 | grep -Ev "$F" | grep -E "error|memory cap|step time|process peak|allocator" | tee "$OUT/train-r$r-6.5gb.txt"
  done
  peft
  if [ -f .gpu/peers/bitsandbytes.tar.gz ]; then
    [ -d /tmp/bnb-lib/bitsandbytes ] || { mkdir -p /tmp/bnb-lib && tar xzf .gpu/peers/bitsandbytes.tar.gz -C /tmp/bnb-lib; }
    python3 bench/mistral_shape.py "$WORK/mistral-7b-random"
    for i in 1 2; do
      for r in 16 2; do
        PYTHONPATH="$PYDIR:/tmp/bnb-lib" python3 bench/pytorch_train.py --stack qlora --checkpoint "$WORK/mistral-7b-random" \
          --seq 512 --batch 2 --rank $r --steps 8 2>&1 | tail -3 | tee "$OUT/qlora-train-r$r-$i.txt"
      done
    done
  else
    echo "no .gpu/peers/bitsandbytes.tar.gz (bash bench/peers/fetch-qlora.sh): the prototype's QLoRA stack is skipped"
  fi
  for i in 1 2; do
    PYTHONPATH="$PYDIR" python3 bench/pytorch_train.py --seq 512 --batch 2 --rank 16 2>&1 | tail -3 | tee "$OUT/pytorch-train-r16-$i.txt"
  done
  for r in 16 2; do
    freeski-bot "${T[@]}" --rank $r 2>&1 | grep -E "step time" | tee "$OUT/train-r$r-again.txt"
  done
}
# GPU time by kernel of the work a `freeski-bot ARGS...` run marks for the profiler
# (cuProfilerStart/Stop), with nsys (or ncu without it); NAME names the files in $OUT.
profile_run() {
  local name=$1; shift
  local NSYS; NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
  if [ -n "$NSYS" ]; then
    $NSYS profile -t cuda --capture-range=cudaProfilerApi --stats=false -o "/tmp/$name" -f true freeski-bot "$@" 2>&1 | grep -Ev "$F" | tail -8
    $NSYS stats -r cuda_gpu_trace -f csv -o "/tmp/$name" "/tmp/$name.nsys-rep" >/dev/null 2>&1
    xz -T0 -k -c "/tmp/${name}_cuda_gpu_trace.csv" > "$OUT/$name-trace.csv.xz"
    python3 bench/ncu_summary.py "/tmp/${name}_cuda_gpu_trace.csv" 400 | tee "$OUT/$name-kern.txt" | sed -n '401,460p'
  else
    echo "no nsys: ncu over every launch of the capture"
    $NCU --cache-control none --clock-control none --profile-from-start off --csv --metrics gpu__time_duration.sum freeski-bot "$@" > "/tmp/$name-ncu.csv" 2>/dev/null
    xz -T0 -k -c "/tmp/$name-ncu.csv" > "$OUT/$name-ncu.csv.xz"
    python3 bench/ncu_summary.py "/tmp/$name-ncu.csv" 400 | tee "$OUT/$name-kern.txt" | sed -n '401,460p'
  fi
}
stage_trainprof() {
  # The last of 2 training steps, on the Q4_K_M mix.
  profile_run train bench train --random mistral-7b --quant q4k-m --seq 512 --batch 2 --device cuda:0 --rank 16 --steps 2 --profile-last-step
}
stage_genprof() {
  # A 512-token prefill, 16 batch-1 decode tokens, and 15 steps of 8 streams decoding together,
  # on the Q4_K_M file (else the random Mistral-7B Q4_K_M mix), bare.
  local part streams m=(--model "$Q4KM"); [ -f "$Q4KM" ] || m=(--random mistral-7b --quant q4k-m)
  for part in ${GENPROF_PARTS:-prefill decode batched}; do
    streams=0; [ "$part" = batched ] && streams=8
    profile_run "gen-$part" bench generate "${m[@]}" --device cuda:0 --lora-rank 0 --streams $streams --compare false \
      --repeats 2 --decode-tokens 16 --profile $part
  done
}
stage_torchprof() {
  peft; PYTHONPATH="$PYDIR" python3 bench/pytorch_train.py --seq 512 --batch 2 --rank 16 --steps 2 --profile 2>&1 | tail -50 | tee "$OUT/pytorch-train-prof.txt"
}
stage_pytorch() {
  python3 bench/pytorch_generate.py 2>&1 | tail -12 | tee "$OUT/pytorch.txt"
  peft; PYTHONPATH="$PYDIR" python3 bench/pytorch_generate.py --lora-rank 16 2>&1 | tail -12 | tee "$OUT/pytorch-r16.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
git log -1 --format='commit %h %s' 2>/dev/null | tee "$OUT/commit.txt"
for s in "${@:-parity batching gen serve train pytorch}"; do
  for t in $s; do
    echo "=== $t ($(date +%T))"
    "stage_$t"
  done
done
echo "=== done ($(date +%T))"
