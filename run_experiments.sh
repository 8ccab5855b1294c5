#!/usr/bin/env bash
# Every experiment of the SNV paper (docs/paper.md sections 2 and 4), one train.py results folder each.
#
#   bash run_experiments.sh [--dry-run] [--quick | --compare] [--only GROUP[,GROUP...]] [--jobs N]
#
# Groups (run in this order; bounds first so that the snv runs find their joint reference):
#   bounds        sgd (lower bound) and joint (upper bound) for every main-table setting
#   pmnist        SNV on PMNIST, 10 tasks, TIL and CIL; the same with the paper-literal --inference dense
#   splitmnist    SNV and SGD on Split-MNIST, 5 tasks, TIL and CIL, at a CPU profile (not the paper's: ResNet-18
#                 --width 8, 10 epochs, 30 Shapley orderings on 2 x 64 images; see docs/results.md)
#   cifar100      SNV on CIFAR-100, 10 and 20 tasks, TIL and CIL
#   tinyimagenet  SNV on TinyImageNet, 10 and 20 tasks, TIL and CIL
#   imagenet1k    SNV on ImageNet-1k, 10, 20 and 50 tasks, TIL and CIL
#   capacity      Table 3: TIL, 10 tasks, c in {0.03, 0.05, 0.1, 0.3, 0.5}, CIFAR-100 and TinyImageNet
#                 (c = 0.1 is the 10-task TIL main run itself and shares its folder)
#   pruning       Fig. 4: the 10-task PMNIST and CIFAR-100 SNV runs and their sgd bounds, TIL and CIL (the same
#                 folders as the pmnist, cifar100 and bounds groups: every run here records its pruning curve)
#   baselines     the comparison runs of run_experiments_baselines.txt, plus the sgd/joint bounds
#
# Each experiment writes to <results>/<group>/<name> (<results> = $SNV_RESULTS_DIR, default results).
# Every train.py run here passes --prune-analysis: Fig. 4's curve is measured after the run at the cost of
# 19 test evaluations, and the flag changes no other result.
# Main runs use c = 1/T (train.py's default) and seeds 42..51. Seeds run one train.py call each, then one
# --resume call over all seeds writes summary.json; an experiment whose summary.json covers all seeds is
# skipped, a seed whose JSON exists is kept and a seed with a checkpoint continues (--resume; a baseline's or
# a --reset run's seed starts over, --overwrite, as its checkpoint cannot be continued), so running the
# script again resumes an interrupted campaign. An snv seed gets --joint-results when the joint run of the
# same setting and seed exists. A failing experiment is reported and the others still run; the exit status
# is 1 if any failed. Never start it while another train.py still writes into one of its folders (e.g. a
# manual results/pmnist/snv_* run): that seed would be run twice at once.
#
# --quick runs a CPU-sized version of every group (2 seeds, 1-2 epochs, ResNet --width 8/16, 5 Shapley
# orderings on 2 evaluation batches) under <results>/quick/: these are smoke-test numbers, not the protocol.
# --compare runs only the method comparison of issue 5 at a protocol this 2-core CPU finishes, under
# <results>/compare/: PMNIST 10 tasks, MLP 784-200x4, Adam lr 1e-3, batch 64 and 5 epochs (the paper: 10
# and 20), SNV's Shapley settings unchanged, seeds 42 43 44, one hyperparameter point per method; the
# commands are in run_experiments_compare.txt (same format as the baselines file, SNV and the bounds included).
# --dry-run prints every command without running anything.
# --jobs N runs up to N train.py processes at once (default: the number of CPU cores), each seed its own
# process logged to <folder>/train.log; a folder's summary.json is written once all runs have finished. With
# N > 1 an snv seed started while its joint reference still runs gets no --joint-results (report.py computes
# intransigence against the joint run all the same).
# Environment: SNV_DATA_DIR (data folder, read by train.py), SNV_RESULTS_DIR, SNV_BASELINES_FILE, PYTHON.
#
# run_experiments_baselines.txt (written with the baselines) adds the comparison runs, one command a line:
#   python train.py ARGS --seeds S... --out-dir DIR   or   python rank_correlation.py ARGS ...
# each runs with its own seeds (the quick seeds under --quick) into <results>/baselines/<basename of DIR>;
# blank lines and lines starting with # are ignored.
set -uo pipefail
cd "$(dirname "$0")"

GROUPS_ALL=(bounds pmnist splitmnist cifar100 tinyimagenet imagenet1k capacity pruning baselines)
DRY_RUN=0
QUICK=0
COMPARE=0
ONLY=""
JOBS=$(nproc 2>/dev/null || echo 1)
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --quick) QUICK=1 ;;
        --compare) COMPARE=1 ;;
        --only)
            [[ $# -ge 2 ]] || { echo "error: --only needs a group name" >&2; exit 2; }
            ONLY=$2
            shift ;;
        --only=*) ONLY=${1#--only=} ;;
        --jobs)
            [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || { echo "error: --jobs needs a whole number >= 1" >&2; exit 2; }
            JOBS=$2
            shift ;;
        -h | --help) sed -n '2,40p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
((QUICK && COMPARE)) && { echo "error: --quick and --compare are separate campaigns; give one" >&2; exit 2; }
if ((COMPARE)); then
    [[ -z $ONLY || $ONLY == baselines ]] || { echo "error: --compare runs the baselines group only" >&2; exit 2; }
    ONLY=baselines
fi
for g in ${ONLY//,/ }; do
    [[ " ${GROUPS_ALL[*]} " == *" $g "* ]] || { echo "error: unknown group $g; groups: ${GROUPS_ALL[*]}" >&2; exit 2; }
done

PYTHON=${PYTHON:-python}
# the methods whose checkpoint holds their whole state (baselines.resumable, read from the registry)
RESUMABLE=$("$PYTHON" -c 'import baselines
print(*(name for name in baselines.METHODS if baselines.resumable(name, "none")))') \
    || { echo "error: $PYTHON cannot import baselines.py: install requirements.txt" >&2; exit 2; }
read -r -a RESUMABLE_METHODS <<<"$RESUMABLE"
RESULTS=${SNV_RESULTS_DIR:-results}
BASELINES_FILE=${SNV_BASELINES_FILE:-run_experiments_baselines.txt}
declare -A PROFILE
if ((QUICK)); then
    BASE=$RESULTS/quick
    SEEDS=(42 43)
    SHAPLEY_QUICK="--max-permutations 5 --shapley-eval-batches 2"
    PROFILE=(
        [pmnist]="--epochs 2 $SHAPLEY_QUICK"
        [splitmnist]="--width 8 --epochs 2 $SHAPLEY_QUICK"
        [cifar100]="--width 16 --epochs 2 $SHAPLEY_QUICK"
        [tinyimagenet]="--width 16 --epochs 2 $SHAPLEY_QUICK"
        [imagenet1k]="--width 16 --epochs 1 $SHAPLEY_QUICK"
    )
elif ((COMPARE)); then
    BASE=$RESULTS/compare
    SEEDS=(42 43 44)
    PROFILE=([pmnist]="--batch-size 64 --epochs 5")
    BASELINES_FILE=${SNV_BASELINES_FILE:-run_experiments_compare.txt}
else
    BASE=$RESULTS
    SEEDS=(42 43 44 45 46 47 48 49 50 51)
    # Split-MNIST is not a paper table: it measures the convolutional path on real images on a 2-core CPU.
    PROFILE=([splitmnist]="--width 8 --epochs 10 --shapley-eval-batches 2 --max-permutations 30")
fi

FAILED=()
declare -A VISITED  # folders already handled in this invocation (the capacity group shares c = 0.1)

selected() {  # selected GROUP: true if GROUP is to run
    [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]
}

show() {  # show ARGS...: print a command, shell-quoted
    printf '%q ' "$@" | sed 's/ $//'
    echo
}

complete() {  # complete DIR: true if DIR/summary.json covers every seed of this campaign
    [[ -f $1/summary.json ]] || return 1
    "$PYTHON" - "$1/summary.json" "${SEEDS[@]}" <<'EOF'
import json, sys
try:
    runs = set(json.load(open(sys.argv[1]))["runs"])
except (OSError, ValueError, KeyError, TypeError):
    sys.exit(1)
sys.exit(0 if {int(s) for s in sys.argv[2:]} <= runs else 1)
EOF
}

STATUS=$(mktemp -d)  # one file per launched run: its exit status, written when it ends
trap 'rm -rf "$STATUS"' EXIT
LAUNCHED=""          # the status file of the last launch
NRUN=0
FINISH=()            # deferred summaries: "NAME<tab>DIR<tab>STATUS FILES<tab>quoted summary command (or empty)"

launch() {  # launch DIR ARGS...: print a command; unless --dry-run run it in the background, at most $JOBS at once
    local dir=$1
    shift
    show "$@"
    NRUN=$((NRUN + 1))
    LAUNCHED=$STATUS/$NRUN
    if ((DRY_RUN)); then
        echo 0 >"$LAUNCHED"
        return 0
    fi
    while (($(jobs -rp | wc -l) >= JOBS)); do wait -n; done
    mkdir -p "$dir"
    echo "# started, log: $dir/train.log"
    { "$@" >>"$dir/train.log" 2>&1; echo $? >"$LAUNCHED"; } &
}

finish_later() {  # finish_later NAME DIR "STATUS FILES" [SUMMARY ARGS...]: once the runs end, check them, summarise
    local name=$1 dir=$2 statuses=$3
    shift 3
    local cmd=""
    (($#)) && cmd=$(printf '%q ' "$@")
    FINISH+=("$name"$'\t'"$dir"$'\t'"$statuses"$'\t'"$cmd")
    ((DRY_RUN)) && finish_all
}

finish_all() {  # wait for every launched run; mark failed experiments, write the summaries of the others
    wait
    local entry name dir statuses cmd f ok
    for entry in "${FINISH[@]}"; do
        IFS=$'\t' read -r name dir statuses cmd <<<"$entry"
        ok=1
        for f in $statuses; do
            [[ $(cat "$f" 2>/dev/null) == 0 ]] || ok=0
        done
        if ((!ok)); then
            FAILED+=("$name")
        elif [[ -n $cmd ]]; then
            eval "show $cmd"
            ((DRY_RUN)) || eval "$cmd" '>>"$dir/train.log" 2>&1' || FAILED+=("$name")
        fi
    done
    FINISH=()
}

task_suffix() {  # task_suffix DATASET T: "_T<T>" where the dataset is run with several task counts
    case $1 in pmnist | splitmnist) ;; *) echo "_T$2" ;; esac
}

experiment() {  # experiment GROUP/NAME JOINT_DIR|- TRAIN_ARGS...: one results folder, all seeds
    local name=$1 joint=$2
    shift 2
    local dir=$BASE/$name dataset=pmnist method=snv reset=none prev=""
    for a in "$@"; do
        [[ $prev == --dataset ]] && dataset=$a
        [[ $prev == --method ]] && method=$a
        [[ $prev == --reset ]] && reset=$a
        prev=$a
    done
    local resumable=0
    [[ $reset == none && " ${RESUMABLE_METHODS[*]} " == *" $method "* ]] && resumable=1
    # shellcheck disable=SC2206  # the profiles are word lists
    local cmd=("$PYTHON" train.py "$@" ${PROFILE[$dataset]:-} --prune-analysis --out-dir "$dir")
    echo "# $name"
    if [[ -n ${VISITED[$dir]:-} ]]; then
        echo "# already handled above in this campaign"
        return 0
    fi
    VISITED[$dir]=1
    if complete "$dir"; then
        echo "# skipped: $dir/summary.json covers seeds ${SEEDS[*]}"
        return 0
    fi
    local s statuses=""
    for s in "${SEEDS[@]}"; do
        [[ -f $dir/seed$s.json ]] && continue
        local extra=()
        # a baseline's or a reset's checkpoint cannot be continued: that seed starts over
        [[ -f $dir/checkpoint_seed$s.pt ]] && { ((resumable)) && extra+=(--resume) || extra+=(--overwrite); }
        [[ $method == snv && $joint != - && -f $joint/seed$s.json ]] && extra+=(--joint-results "$joint/seed$s.json")
        launch "$dir" "${cmd[@]}" --seeds "$s" "${extra[@]}"
        statuses+=" $LAUNCHED"
    done
    finish_later "$name" "$dir" "$statuses" "${cmd[@]}" --seeds "${SEEDS[@]}" --resume
}

main_setting() {  # main_setting GROUP METHOD DATASET SCENARIO T: a main-table run (c = 1/T)
    local group=$1 method=$2 dataset=$3 scenario=$4 tasks=$5 sfx
    sfx=$(task_suffix "$dataset" "$tasks")
    experiment "$group/${method}_$scenario$sfx" "$BASE/bounds/${dataset}_joint_$scenario$sfx" \
        --dataset "$dataset" --method "$method" --scenario "$scenario" --num-tasks "$tasks"
}

bound_setting() {  # bound_setting METHOD DATASET SCENARIO T: the sgd or joint bound of a main-table setting
    local method=$1 dataset=$2 scenario=$3 tasks=$4
    experiment "bounds/${dataset}_${method}_$scenario$(task_suffix "$dataset" "$tasks")" - \
        --dataset "$dataset" --method "$method" --scenario "$scenario" --num-tasks "$tasks"
}

MAIN_SETTINGS=("pmnist 10" "cifar100 10" "cifar100 20" "tinyimagenet 10" "tinyimagenet 20"
               "imagenet1k 10" "imagenet1k 20" "imagenet1k 50")

bounds() {  # sgd and joint for every main-table setting
    local setting dataset tasks scenario method
    for setting in "${MAIN_SETTINGS[@]}"; do
        read -r dataset tasks <<<"$setting"
        for scenario in task_il class_il; do
            for method in sgd joint; do
                bound_setting "$method" "$dataset" "$scenario" "$tasks"
            done
        done
    done
}

dataset_group() {  # dataset_group DATASET T...: SNV, TIL and CIL, at each task count
    local dataset=$1 tasks scenario
    shift
    for tasks in "$@"; do
        for scenario in task_il class_il; do
            main_setting "$dataset" snv "$dataset" "$scenario" "$tasks"
        done
    done
}

pmnist_group() {  # the main PMNIST rows and, at the same protocol, the paper-literal dense reading (issue 22)
    local scenario
    dataset_group pmnist 10
    for scenario in task_il class_il; do
        experiment "pmnist/snv_${scenario}_dense" "$BASE/bounds/pmnist_joint_$scenario" \
            --dataset pmnist --method snv --scenario "$scenario" --num-tasks 10 --inference dense
    done
}

splitmnist() {
    local method scenario
    for method in snv sgd; do
        for scenario in task_il class_il; do
            experiment "splitmnist/${method}_$scenario" - \
                --dataset splitmnist --method "$method" --scenario "$scenario" --num-tasks 5
        done
    done
    # class-incremental without replay (issue 19): SNV with the best replay-free rule on PMNIST
    experiment "splitmnist/snv_class_il-taskinf" - \
        --dataset splitmnist --method snv --scenario class_il --num-tasks 5 --task-inference marginal
}

capacity() {  # Table 3; c = 0.1 = 1/T is the main 10-task TIL run
    local dataset c
    for dataset in cifar100 tinyimagenet; do
        for c in 0.03 0.05 0.1 0.3 0.5; do
            local name=capacity/${dataset}_c$c
            [[ $c == 0.1 ]] && name=$dataset/snv_task_il_T10
            experiment "$name" "$BASE/bounds/${dataset}_joint_task_il_T10" \
                --dataset "$dataset" --method snv --scenario task_il --num-tasks 10 --sparsity "$c"
        done
    done
}

pruning() {  # Fig. 4: the main runs and sgd bounds it reads (each records its pruning curve)
    local dataset scenario
    for dataset in pmnist cifar100; do
        for scenario in task_il class_il; do
            main_setting "$dataset" snv "$dataset" "$scenario" 10
            bound_setting sgd "$dataset" "$scenario" 10
        done
    done
}

baselines() {  # the sgd/joint bounds (unless the bounds group runs too), then run_experiments_baselines.txt
    ((COMPARE)) || selected bounds || bounds
    if [[ ! -f $BASELINES_FILE ]]; then
        echo "# $BASELINES_FILE not found: baselines = the sgd/joint bounds only"
        return 0
    fi
    local line words
    while read -r line; do
        [[ -z $line || $line == \#* ]] && continue
        read -r -a words <<<"$line"
        baseline_line "${words[@]}"
    done <"$BASELINES_FILE"
}

baseline_line() {  # baseline_line python SCRIPT ARGS...: one command of the baselines file
    local script=$2 args=() seeds=() out="" dataset=pmnist scenario=task_il tasks=10 method=snv
    shift 2
    while (($#)); do
        case $1 in
            --seeds)
                shift
                while (($#)) && [[ $1 != --* ]]; do seeds+=("$1"); shift; done
                continue ;;
            --out-dir) out=${2%/}; shift 2; continue ;;
            --dataset) dataset=$2 ;;
            --scenario) scenario=$2 ;;
            --num-tasks) tasks=$2 ;;
            --method) method=$2 ;;
        esac
        args+=("$1")
        shift
    done
    local name=baselines/${out##*/}
    ((QUICK)) || ((${#seeds[@]} == 0)) || local -a SEEDS=("${seeds[@]}")
    if [[ $script == train.py ]]; then
        local joint=-
        if [[ $method == snv ]]; then  # the comparison keeps its own joint runs beside the others
            joint=$BASE/bounds/${dataset}_joint_$scenario$(task_suffix "$dataset" "$tasks")
            ((COMPARE)) && joint=$BASE/baselines/${dataset}_${scenario}_joint
        fi
        experiment "$name" "$joint" "${args[@]}"
    else
        analysis "$name" "$script" "${args[@]}"
    fi
}

analysis() {  # analysis GROUP/NAME SCRIPT ARGS...: a per-seed analysis writing <name>_seed<s>.json files
    local name=$1 dir=$BASE/$1 s missing=() dataset=pmnist prev=""
    shift
    for a in "$@"; do
        [[ $prev == --dataset ]] && dataset=$a
        prev=$a
    done
    echo "# $name"
    for s in "${SEEDS[@]}"; do
        compgen -G "$dir/*_seed$s.json" >/dev/null || missing+=("$s")
    done
    if ((${#missing[@]} == 0)); then
        echo "# skipped: every seed's JSON exists in $dir"
        return 0
    fi
    # shellcheck disable=SC2206  # the profiles are word lists
    local cmd=("$PYTHON" "$@" ${PROFILE[$dataset]:-} --out-dir "$dir" --seeds "${missing[@]}")
    launch "$dir" "${cmd[@]}"
    finish_later "$name" "$dir" "$LAUNCHED"
}

if ((QUICK)); then
    echo "# QUICK mode: CPU-sized settings (seeds ${SEEDS[*]}, few epochs, narrow ResNet, 5 Shapley orderings)"
    echo "# results go to $BASE: smoke-test numbers, never the paper's protocol"
elif ((COMPARE)); then
    echo "# COMPARE mode: PMNIST method comparison, batch 64, 5 epochs, seeds ${SEEDS[*]}, from $BASELINES_FILE"
    echo "# results go to $BASE: one protocol for every method, not the paper's (batch 10, 20 epochs)"
else
    echo "# full protocol: seeds ${SEEDS[*]}, results under $BASE"
fi
echo "# data: ${SNV_DATA_DIR:-./data}${ONLY:+; groups: $ONLY}"
((DRY_RUN)) && echo "# dry run: nothing is executed"

for group in "${GROUPS_ALL[@]}"; do
    selected "$group" || continue
    echo "## group $group"
    case $group in
        bounds) bounds ;;
        pmnist) pmnist_group ;;
        splitmnist) splitmnist ;;
        cifar100) dataset_group cifar100 10 20 ;;
        tinyimagenet) dataset_group tinyimagenet 10 20 ;;
        imagenet1k) dataset_group imagenet1k 10 20 50 ;;
        capacity) capacity ;;
        pruning) pruning ;;
        baselines) baselines ;;
    esac
done

finish_all
if ((${#FAILED[@]})); then
    echo "# FAILED (${#FAILED[@]}): ${FAILED[*]}" >&2
    exit 1
fi
echo "# done"
