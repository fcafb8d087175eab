# Sourced by the scripts that record a run in benchmarks/results: the line naming the machine.
cpu_line() {
    echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores;" \
        "$(grep -m1 -o -w -E 'avx512_bf16|avx512_vnni|avx512f|avx2' /proc/cpuinfo | sort -u | xargs)"
}
