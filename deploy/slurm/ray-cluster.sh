# Sourced by the sbatch scripts: start a Ray cluster over the nodes of this Slurm allocation
# (one head, one worker per other node, each with the node's GPUs and CPUs), wait until every
# node has joined, and stop it all when the script exits (success, failure or scancel).
#
# Settings (environment): HVAE_EXEC, a prefix for commands run on the nodes, e.g.
#   HVAE_EXEC="apptainer exec --nv hvae-pipeline.sif"   (the image of deploy/docker)
# RAY_PORT (6379), RAY_WAIT_SECONDS (300).

ray_cluster_start() {
    local exec_prefix=${HVAE_EXEC:-}
    local port=${RAY_PORT:-6379}
    mapfile -t RAY_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    RAY_HEAD=${RAY_NODES[0]}
    local head_ip
    head_ip=$(srun --nodes=1 --ntasks=1 --overlap -w "$RAY_HEAD" hostname --ip-address | awk '{print $1}')
    export RAY_ADDRESS="$head_ip:$port"
    local cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
    local gpus=${SLURM_GPUS_ON_NODE:-0}
    echo "ray: head $RAY_HEAD ($RAY_ADDRESS), ${#RAY_NODES[@]} node(s), $cpus CPUs and $gpus GPUs each"
    trap ray_cluster_stop EXIT
    srun --nodes=1 --ntasks=1 --overlap -w "$RAY_HEAD" $exec_prefix \
        ray start --head --node-ip-address="$head_ip" --port="$port" --num-cpus="$cpus" --num-gpus="$gpus" \
        --include-dashboard=false --block &
    ray_wait_for 1
    local node
    for node in "${RAY_NODES[@]:1}"; do
        srun --nodes=1 --ntasks=1 --overlap -w "$node" $exec_prefix \
            ray start --address="$RAY_ADDRESS" --num-cpus="$cpus" --num-gpus="$gpus" --block &
    done
    ray_wait_for "${#RAY_NODES[@]}"
}

ray_wait_for() {  # wait until $1 nodes are alive in the cluster
    local want=$1 waited=0 limit=${RAY_WAIT_SECONDS:-300}
    until [ "$(${HVAE_EXEC:-} python -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null | tail -1)" = "$want" ]; do
        sleep 5
        waited=$((waited + 5))
        if [ "$waited" -ge "$limit" ]; then
            echo "ray: only some of $want node(s) joined within ${limit}s" >&2
            return 1
        fi
    done
    echo "ray: $want node(s) up"
}

ray_cluster_stop() {
    echo "ray: stopping the cluster"
    srun --nodes="${#RAY_NODES[@]}" --ntasks="${#RAY_NODES[@]}" --ntasks-per-node=1 --overlap ${HVAE_EXEC:-} ray stop --force >/dev/null 2>&1 || true
    wait 2>/dev/null || true
}
