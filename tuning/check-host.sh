#!/usr/bin/env bash
# check-host.sh: read-only check of a host for meshd (see README.md).
# Prints one PASS/WARN/FAIL line per check; exits 1 if any check FAILs, else 0.
# It only reads /proc, /boot and ulimit values; it never changes the system.
set -u

failures=0
pass() { printf 'PASS  %-22s %s\n' "$1" "$2"; }
warn() { printf 'WARN  %-22s %s\n' "$1" "$2"; }
fail() { printf 'FAIL  %-22s %s\n' "$1" "$2"; failures=$((failures + 1)); }

# Prints the content of a /proc file, or nothing if it cannot be read.
read_proc() { cat -- "$1" 2>/dev/null || true; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

min_buf=16777216           # 16 MiB: smallest rmem_max/wmem_max worth running with
min_memlock_kib=524288     # 512 MiB, in KiB as `ulimit -l` reports it
want_nofile=1048576        # what meshd.service sets
min_somaxconn=4096

# Kernel >= 5.10
release="$(uname -r)"
major="${release%%.*}"
rest="${release#*.}"
minor="${rest%%[!0-9]*}"
if ! is_uint "${major}" || ! is_uint "${minor}"; then
    warn kernel "cannot parse version '${release}'"
elif (( major > 5 || (major == 5 && minor >= 10) )); then
    pass kernel "${release} (>= 5.10)"
else
    fail kernel "${release}: meshd needs >= 5.10 for io_uring"
fi

# io_uring enabled (meshd checks this at start too)
knob=/proc/sys/kernel/io_uring_disabled
if [[ -r "${knob}" ]]; then
    value="$(read_proc "${knob}")"
    case "${value}" in
        0) pass io_uring "kernel.io_uring_disabled = 0" ;;
        1) fail io_uring "kernel.io_uring_disabled = 1: only group kernel.io_uring_group may use it; set 0" ;;
        *) fail io_uring "kernel.io_uring_disabled = ${value}: io_uring is off; set 0" ;;
    esac
else
    kconfig="/boot/config-${release}"
    if [[ -r "${kconfig}" ]] && ! grep -q '^CONFIG_IO_URING=y' "${kconfig}"; then
        fail io_uring "${kconfig} has no CONFIG_IO_URING=y"
    else
        pass io_uring "no io_uring_disabled knob (kernel < 6.6): enabled if built with CONFIG_IO_URING"
    fi
fi

# RLIMIT_MEMLOCK of this shell (meshd checks it at start; meshd.service sets it to infinity)
memlock="$(ulimit -l)"
if [[ "${memlock}" == unlimited ]]; then
    pass memlock "ulimit -l = unlimited"
elif is_uint "${memlock}" && (( memlock >= min_memlock_kib )); then
    pass memlock "ulimit -l = ${memlock} KiB (>= 512 MiB)"
else
    warn memlock "ulimit -l = ${memlock} KiB in this shell: < 512 MiB (meshd.service sets infinity; root meshd raises it itself)"
fi

# RLIMIT_NOFILE of this shell
nofile="$(ulimit -n)"
if [[ "${nofile}" == unlimited ]] || { is_uint "${nofile}" && (( nofile >= want_nofile )); }; then
    pass nofile "ulimit -n = ${nofile}"
else
    warn nofile "ulimit -n = ${nofile} in this shell: < ${want_nofile} (meshd.service sets ${want_nofile})"
fi
nr_open="$(read_proc /proc/sys/fs/nr_open)"
if is_uint "${nr_open}" && (( nr_open < want_nofile )); then
    warn nofile "fs.nr_open = ${nr_open} < ${want_nofile}: LimitNOFILE=${want_nofile} cannot be applied"
fi

# Listen backlog
somaxconn="$(read_proc /proc/sys/net/core/somaxconn)"
if ! is_uint "${somaxconn}"; then
    warn somaxconn "cannot read net.core.somaxconn"
elif (( somaxconn >= min_somaxconn )); then
    pass somaxconn "net.core.somaxconn = ${somaxconn}"
else
    warn somaxconn "net.core.somaxconn = ${somaxconn} < ${min_somaxconn} (see 99-meshd.sysctl.conf)"
fi

# Socket buffer ceilings
for name in rmem_max wmem_max; do
    value="$(read_proc "/proc/sys/net/core/${name}")"
    if ! is_uint "${value}"; then
        warn "${name}" "cannot read net.core.${name}"
    elif (( value >= min_buf )); then
        pass "${name}" "net.core.${name} = ${value}"
    else
        warn "${name}" "net.core.${name} = ${value} < ${min_buf} (see 99-meshd.sysctl.conf)"
    fi
done

# CPUs: shard i is pinned to core i when runtime.pin_cores = true
cpus="$(getconf _NPROCESSORS_ONLN 2>/dev/null || true)"
if ! is_uint "${cpus}"; then
    warn cpus "cannot count online CPUs"
elif (( cpus >= 2 )); then
    pass cpus "${cpus} online CPUs (shards take cores 0..N-1; leave at least one for control/api/IRQs)"
else
    warn cpus "1 online CPU: the shard, control and api threads share it"
fi

# isolcpus on the kernel command line (optional)
isolcpus=""
cmdline=()
read -r -a cmdline < /proc/cmdline 2>/dev/null || true
for arg in "${cmdline[@]}"; do
    case "${arg}" in
        isolcpus=*) isolcpus="${arg#isolcpus=}" ;;
        *) ;;
    esac
done
if [[ -n "${isolcpus}" ]]; then
    pass isolcpus "isolcpus=${isolcpus} (should cover the shard cores 0..N-1 and nothing else)"
else
    pass isolcpus "not set (optional; see README.md)"
fi

if (( failures > 0 )); then
    printf '%d check(s) failed\n' "${failures}"
    exit 1
fi
exit 0
