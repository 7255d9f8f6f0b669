#!/usr/bin/env bash
# bnrepro GPU check: every GPU-only path of the product in one call of <= 8 minutes on one H100/H200, each check
# with its own time limit and PASS / FAIL / WARN / INFO lines in $OUT/summary.txt (logs in $OUT/logs.tar.gz).
# Run from the repository root (device tool: timeout_s 560, carry .whl and .device-data; README "GPU check").
# Data: $DATA, .device-data, ../shared/data or shared/data with mnist/raw (or fashion-mnist/raw) and
# imagenet-sample/val. pydantic is not in the device image: its wheels travel in .whl/. ONLY="a b" runs just
# the checks named (pytest-gpu decode-race synthetic bench proxy resume ensemble torchrun other-cmds).
set -u
export DEADLINE=${DEADLINE:-465} END_AT=$(( $(date +%s) + ${DEADLINE:-465} ))
W=$(mktemp -d); export REPO=$PWD W BNREPRO_CACHE=$W/cache PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS=8
OUTDIR=${OUT:-$W/out}; mkdir -p "$OUTDIR"; SUM=$OUTDIR/summary.txt; : > "$SUM"
say() { echo "$*" | tee -a "$SUM"; }
python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" .whl/*.whl
export PYTHONPATH="$REPO:$W/site${PYTHONPATH:+:$PYTHONPATH}" FM="" SAMPLE="" INET=$W/inet
for d in "${DATA:-}" .device-data ../shared/data shared/data; do
  [ -n "$d" ] && [ -d "$d" ] || continue
  for k in fashion-mnist mnist; do [ -z "$FM" ] && [ -f "$d/$k/raw/train-labels-idx1-ubyte.gz" ] && FM=$(cd "$d/$k/raw"; pwd); done
  [ -z "$SAMPLE" ] && [ -d "$d/imagenet-sample/val" ] && SAMPLE=$(cd "$d/imagenet-sample"; pwd)
done
mkdir -p "$INET"; [ -n "$SAMPLE" ] && ln -s "$SAMPLE/val" "$INET/train" && ln -s "$SAMPLE/val" "$INET/val"
say "ENV   $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); $(python3 -c 'import torch,torchvision as v,bnrepro.cli
print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), "nccl", torch.cuda.nccl.version(), "torchvision", v.__version__)' 2>&1 | tail -n1)"
say "DATA  idx ${FM:-MISSING}; sample ${SAMPLE:-MISSING} ($(ls "$INET"/val/*/* 2>/dev/null | wc -l) JPEGs)"
check() {  # NAME NEED BUDGET FUNCTION: skipped if < NEED s are left; lines PASS/FAIL/WARN/INFO go to the summary
  [[ -n "${ONLY:-}" && " $ONLY " != *" $1 "* ]] && return   # ONLY="resume other-cmds": just those checks
  local rem=$(( END_AT - $(date +%s) )) b=$3 rc
  (( rem < $2 )) && { say "SKIP  $1 (${rem}s left)"; return; }; (( b > rem )) && b=$rem
  timeout -k 5 "$b" bash -c "$4" > "$W/$1.log" 2>&1; rc=$?
  grep -E "^(PASS|FAIL|WARN|INFO) " "$W/$1.log" | cut -c1-400 | tee -a "$SUM"
  if (( rc == 124 || rc == 137 )); then say "TIME  $1: killed after ${b}s"
  elif ! grep -qE "^(PASS|FAIL|WARN|INFO) " "$W/$1.log"; then say "FAIL  $1: exit $rc: $(grep . "$W/$1.log" | tail -n1 | cut -c1-300)"; fi
}
bnr() { python3 -m bnrepro "$@"; }
run_of() { ls -d "$1"/*/*/ 2>/dev/null | head -n1; }   # OUT/<experiment>/<run>/

cat > "$W/bench.py" <<'EOF'
import dataclasses, os, time, warnings
from pathlib import Path
import torch, torch.nn as nn, torch.nn.functional as F
from bnrepro import recipes
from bnrepro.engine.distributed import SINGLE_PROCESS as ONE
from bnrepro.experiments import imagenet as E
from bnrepro.models.batchnorm import BatchNorm
from bnrepro.models.inception import ConvUnit, Inception, InceptionConfig
DEV = torch.device(os.environ.get("BENCH_DEVICE", "cuda")); RES = int(os.environ.get("BENCH_RES", "224"))
BATCHES = [int(b) for b in os.environ.get("BENCH_BATCHES", "32,256").split(",")]
WARM, IMAGES = int(os.environ.get("BENCH_WARMUP", "10")), int(os.environ.get("BENCH_IMAGES", "5000"))
def now():
    torch.cuda.synchronize() if DEV.type == "cuda" else None
    return time.perf_counter()
def task_of(batch, recipe="bn-x30", data=".", **opts):  # what `bnrepro imagenet --synthetic` builds
    r = recipes.load(recipe, [f"profiles.paper.batch_size={batch}", f"profiles.paper.resolution={RES}"])
    o = E.Options(Path(data), device=DEV.type, show_progress=False, **opts)
    return E.build(r, "paper", o, ONE, synthetic=data == ".")[:2]
def loop(model, opt, batch, steps):  # a bare training loop on one fixed batch
    x = torch.randn(batch, 3, RES, RES, device=DEV).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=DEV)
    def step():
        with torch.autocast(DEV.type, torch.bfloat16, enabled=DEV.type == "cuda"):
            out = model(x)
        opt.zero_grad(set_to_none=True); F.cross_entropy(out.float(), y).backward(); opt.step()
    for _ in range(WARM): step()
    t = now(); [step() for _ in range(steps)]
    return steps * batch / (now() - t)
def plain():  # the same network with nn.BatchNorm2d
    r = recipes.load("bn-x30"); cfg = InceptionConfig(r.model, r.profiles["paper"].width, 1000); m = Inception(cfg)
    for u in [u for u in m.modules() if isinstance(u, ConvUnit) and isinstance(u[1], BatchNorm)]:
        u[1] = nn.BatchNorm2d(u[1].gamma.numel(), eps=cfg.model.bn_eps, momentum=cfg.model.bn_momentum)
    return m.to(DEV).to(memory_format=torch.channels_last)
for b in BATCHES:
    n = max(1, IMAGES // b); task, opt = task_of(b)
    for cb in (False, True):
        torch.backends.cudnn.benchmark = cb
        print(f"INFO bs{b} bnrepro update (--synthetic path), cudnn.benchmark={cb}: {E.time_training(task, opt, n, WARM):,.0f} img/s")
    print(f"INFO bs{b} bnrepro model, bare loop, no augmentation: {loop(task.model, opt, b, n):,.0f} img/s")
    if b == BATCHES[0]:
        torch.backends.cudnn.benchmark = False; t2, o2 = task_of(b, "inception")
        print(f"INFO bs{b} bnrepro update, recipe inception (LRN, full jitter): {E.time_training(t2, o2, n, WARM):,.0f} img/s")
        del t2, o2
        if DEV.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always"); loss = task.losses(40); opt.zero_grad(); loss.sum().backward(); opt.step()
            torch.cuda.set_sync_debug_mode(0)
            print(f"INFO bs{b} host syncs in one trainer update: {sum('synchroniz' in str(w.message) for w in seen)}")
    del task, opt
    m = plain(); torch.backends.cudnn.benchmark = True
    print(f"INFO bs{b} plain nn.BatchNorm2d net, bare loop, cudnn.benchmark: {loop(m, torch.optim.SGD(m.parameters(), 0.01, 0.9), b, n):,.0f} img/s")
    del m; torch.cuda.empty_cache() if DEV.type == "cuda" else None
if Path(os.environ.get("INET", "-"), "train").exists():  # JPEG path only (decode + augment, no model), bs32
    torch.backends.cudnn.benchmark = False; task, _ = task_of(32, data=os.environ["INET"], resident=False, workers=4)
    for gpu, w in ((True, 4), (False, 4), (False, 14)):
        task.jpegs_as_bytes = gpu and DEV.type == "cuda"; task.options = dataclasses.replace(task.options, workers=w)
        it = task.train_batches(0); [next(it) for _ in range(3)]
        t = now(); k = sum(len(next(it)[1]) for _ in range(15))
        print(f"INFO JPEG path bs32 {'GPU decode (nvJPEG) + batched augment on the GPU' if gpu else 'CPU decode in workers'}, {w} workers: {k / (now() - t):,.0f} img/s")
        del it
EOF
cat > "$W/race.py" <<'EOF'
import glob, os, torch   # decode_jpeg(cuda) vs kernels queued on the caller's stream (pytorch/vision#9606)
from bnrepro.data.pipeline import decode_jpegs_on
from bnrepro.data.split import decode
data = [torch.frombuffer(bytearray(open(f, "rb").read()), dtype=torch.uint8)
        for f in sorted(glob.glob(os.environ["INET"] + "/val/*/*.JPEG"))[:32]]
dev = torch.device("cuda"); gpu = decode_jpegs_on(dev, data); torch.cuda.synchronize()
diff = max((g.cpu().float() - decode(d).float()).abs().mean().item() for g, d in zip(gpu, data))
sizes = [g.numel() for g in gpu]; del gpu
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); c = torch.empty_like(a)
def trials(guard):
    bad = 0
    for _ in range(30):
        victims = [torch.ones(s, dtype=torch.uint8, device=dev) for s in sizes]; torch.cuda.synchronize()
        for _ in range(30): torch.mm(a, a, out=c)           # ~40 ms queued ahead of the reads below
        sums = [v.sum(dtype=torch.int64) for v in victims]; del victims   # freed while their reads still wait
        if guard: torch.cuda.current_stream().synchronize()
        decode_jpegs_on(dev, data); torch.cuda.synchronize()
        bad += any(int(s) != n for s, n in zip(sums, sizes))
    return bad
bad, guarded = trials(False), trials(True)
print(f"{'FAIL' if bad else 'PASS'} decode race: decode_jpegs_on overwrote memory queued kernels still read in {bad}/30 "
      f"trials ({guarded}/30 with a stream sync first); nvJPEG vs libjpeg mean |diff| <= {diff:.2f}")
EOF
cat > "$W/ddp1.py" <<'EOF'
import dataclasses, os, sys   # torchrun entry: all replicas on cuda:0, backend $BNR_BACKEND
from bnrepro.engine import distributed as D
orig = D.Replicas.from_environment.__func__
def one_gpu(cls, backend):
    r = orig(cls, os.environ.get("BNR_BACKEND", "gloo"))
    return dataclasses.replace(r, local_rank=0, flag_device="cpu" if r.flag_device == "cpu" else "cuda:0")
D.Replicas.from_environment = classmethod(one_gpu)
from bnrepro.cli import run
sys.argv[0] = "bnrepro"; run()
EOF
cat > "$W/compare.py" <<'EOF'
import json, sys, pandas as pd, torch   # two runs: same metrics rows and final weights?
a, b = sys.argv[1:3]; ma, mb = pd.read_csv(a + "metrics.csv"), pd.read_csv(b + "metrics.csv")
sa, sb = (torch.load(r + "checkpoint.pt", weights_only=True)["model"] for r in (a, b))
print(json.dumps({"rows": ma[["step", "statistics"]].equals(mb[["step", "statistics"]]),
    "metrics_diff": float((ma[["train_loss", "top1"]] - mb[["train_loss", "top1"]]).abs().max().max()),
    "weights_diff": max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point()),
    "bitwise": ma.equals(mb) and all(torch.equal(sa[k], sb[k]) for k in sa),
    "resumed": len(json.load(open(b + "manifest.json")).get("resumed", []))}))
EOF
mkdir -p "$W/det" && printf 'import torch\ntorch.backends.cudnn.deterministic = True\ntorch.use_deterministic_algorithms(True, warn_only=True)\n' > "$W/det/sitecustomize.py"
export PROXY="imagenet --recipe bn-x30 --profile proxy --device cuda --workers 0"   # no spaces inside values

c_pytest() { python3 -m pytest -m gpu -q -p no:cacheprovider tests > "$W/pt.out" 2>&1; rc=$?; cat "$W/pt.out"
  last=$(grep -E "passed|failed|error|no tests" "$W/pt.out" | tail -n1)
  if (( rc == 0 )) && ! grep -q skipped <<<"$last"; then echo "PASS pytest -m gpu: $last"; else echo "FAIL pytest -m gpu: $last"; fi; }
c_synthetic() { line=$(bnr imagenet --recipe bn-x30 --synthetic --steps 60 --device cuda | grep images/s) \
  && echo "INFO cli --synthetic paper bs32: ${line#*: }"; }
c_proxy() { bnr $PROXY --dataset-dir "$FM" --steps 500 --out "$W/proxy" --set profiles.proxy.eval_every=250 \
  --set profiles.proxy.population_batches=50 || return; r=$(run_of "$W/proxy"); python3 -c "
import json, re; s, m = (json.load(open('$r' + f)) for f in ('summary.json', 'manifest.json'))
rates = re.findall(r'([0-9,]+) images/s', open('$W/proxy.log').read())
print(('PASS' if (s['final_top1'] or 0) > 0.5 else 'FAIL'), f\"proxy 500 steps ({m['dataset']}): top-1 {100 * (s['final_top1'] or 0):.1f}%,\",
      f\"{m['wall_seconds']:.0f} s wall incl. 3 evaluations, progress {rates[-2:]} img/s, {m['precision']}\")"; }
c_resume() { export PYTHONPATH="$W/det:$PYTHONPATH" CUBLAS_WORKSPACE_CONFIG=:4096:8
  a=($PROXY --no-progress --dataset-dir "$FM" --steps 400 --set profiles.proxy.eval_every=200 --set profiles.proxy.checkpoint_every=150
     --set profiles.proxy.population_batches=20)
  bnr "${a[@]}" --out "$W/rA" > "$W/rA.out" 2>&1 || { echo "FAIL resume: first run exit $?"; return; }
  python3 -m bnrepro "${a[@]}" --out "$W/rB" > "$W/rB.out" 2>&1 & pid=$!     # python itself receives the SIGTERM
  for _ in $(seq 900); do ls "$W"/rB/*/*/checkpoint.pt >/dev/null 2>&1 && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  kill -TERM $pid; wait $pid; rc=$?; stop=$(grep -o "interrupted at step [0-9]*" "$W/rB.out")
  bnr imagenet --resume "$(run_of "$W/rB")" --device cuda --workers 0 --no-progress > "$W/rB2.out" 2>&1 || { echo "FAIL resume: exit $? ($stop)"; return; }
  res=$(python3 "$W/compare.py" "$(run_of "$W/rA")" "$(run_of "$W/rB")"); echo "$res"
  nd=$(grep -ho "[a-z_0-9]* does not have a deterministic" "$W"/r*.out | sort -u | cut -d' ' -f1 | tr '\n' ' ')
  if grep -q '"bitwise": true.*"resumed": 1' <<<"$res"; then echo "PASS resume: SIGTERM (exit $rc, $stop) + --resume = uninterrupted run, bit for bit"
  else echo "WARN resume: SIGTERM (exit $rc, $stop) + --resume vs uninterrupted: $res; nondeterministic ops: ${nd:-none}"; fi; }
c_sample() { bnr imagenet --recipe imagenet/ensemble/bn-x30-member1 --dataset-dir "$INET" --device cuda --steps 40 --workers 8 \
    --out "$W/tiny" --no-progress --set profiles.paper.eval_every=40 --set profiles.paper.population_batches=4 || return; r=$(run_of "$W/tiny")
  echo "INFO member trained on the JPEG sample (paper profile, 40 steps, gpu_decode): $(grep -o '"wall_seconds": [0-9.]*' "$r/manifest.json")"
  bnr ensemble --member "$r" --dataset-dir "$INET" --device cuda --workers 8 --out "$W/ens" --no-progress || return
  python3 -c "
import json, pandas as pd; e = '$(run_of "$W/ens")'; m = json.load(open(e + 'manifest.json')); t = pd.read_csv(e + 'results.csv')
n = m['val_images'] * sum(m['crops'])
print('PASS ensemble:', ', '.join(f'{c} crops err {100 * x:.1f}%' for c, x in zip(t.crops, t.top1_error)), f\"on {m['val_images']} images; {n / m['wall_seconds']:,.0f} crops/s\")"
  (( END_AT - $(date +%s) > 40 )) || return
  for d in cuda cpu; do bnr ensemble --member "$r" --dataset-dir "$INET" --device $d --workers 4 --out "$W/e$d" --no-progress --set val_limit=6 || return; done
  python3 -c "
from bnrepro.evaluate.ensemble import load_cache; g, c = load_cache('$(run_of "$W/ecuda")'), load_cache('$(run_of "$W/ecpu")')
d = max((g[k]['probs'].float() - c[k]['probs'].float()).abs().max().item() for k in c)
print('PASS' if d < 3e-2 else 'WARN', f'ensemble GPU bf16 vs CPU fp32, 6 images x 1/10/144 crops at 224 px: max |dp| {d:.1e}')"; }
c_ddp() { BNR_BACKEND=gloo python3 -m torch.distributed.run --standalone --nproc_per_node 2 "$W/ddp1.py" $PROXY \
    --no-progress --dataset-dir "$FM" --steps 100 --out "$W/ddp" --set profiles.proxy.eval_every=100 --set profiles.proxy.population_batches=10 \
    --set train.bn_sync=true > "$W/ddp.out" 2>&1; rc=$?; r=$(run_of "$W/ddp")
  [ -n "$r" ] && grep -q '"status": "complete"' "$r/manifest.json" && (( rc == 0 )) \
    && echo "PASS torchrun 2 replicas on one GPU (gloo DDP, bn_sync): $(grep -o '"final_top1": [0-9.]*' "$r/summary.json"), $(grep -c 'results:' "$W/ddp.out") results line" \
    || echo "FAIL torchrun gloo 2 replicas: exit $rc: $(grep -iE 'error' "$W/ddp.out" | tail -n1 | cut -c1-250)"
  BNR_BACKEND=nccl timeout 40 python3 -m torch.distributed.run --standalone --nproc_per_node 2 "$W/ddp1.py" $PROXY \
    --dataset-dir "$FM" --steps 2 --out "$W/nccl" > "$W/nccl.out" 2>&1
  echo "INFO NCCL, 2 ranks on one GPU: exit $? (124: hung), $(grep -oE 'Duplicate GPU[^.]*|ncclInvalidUsage' "$W/nccl.out" | head -n1)"; }
c_cmds() { mkdir -p "$W/mn/mnist/raw"; ln -sf "$FM"/*.gz "$W/mn/mnist/raw/"   # the idx files as MNIST's
  one() { local name=$1 s=$(date +%s) rc; shift; "$@" > "$W/$name.out" 2>&1; rc=$?
    if (( rc == 0 )); then echo "PASS $name on cuda: $(( $(date +%s) - s )) s; $(grep -E 'estimate|models,|results' "$W/$name.out" | head -n1 | cut -c1-160)"
    else echo "FAIL $name on cuda: exit $rc: $(grep -iE 'error' "$W/$name.out" | tail -n1 | cut -c1-200)"; fi; }
  one sweep bnr sweep --device cuda --steps 300 --lrs 2 --inits 2 --seeds 1 --data-dir "$W/mn" --out "$W/sw" --no-progress
  one reproduce-dry-run bnr reproduce --profile proxy --dry-run --device cuda --results "$W/rep" --no-progress
  one mnist bnr mnist --device cuda --steps 3000 --data-dir "$W/mn" --out "$W/mn1" --no-progress; }
export -f bnr run_of c_pytest c_synthetic c_proxy c_resume c_sample c_ddp c_cmds

check pytest-gpu   60 150 c_pytest
check decode-race  15  50 "python3 $W/race.py"
check synthetic    20  50 c_synthetic
check bench        80 150 "python3 $W/bench.py"
check proxy        35  80 c_proxy
check resume       60 130 c_resume
check ensemble     50 130 c_sample
check torchrun     45  90 c_ddp
check other-cmds   40  90 c_cmds
say "DONE  $(( DEADLINE - (END_AT - $(date +%s)) )) s"
tar -czf "$OUTDIR/logs.tar.gz" -C "$W" --exclude=cache --exclude='*.pt' --exclude=site --exclude=inet . 2>/dev/null
