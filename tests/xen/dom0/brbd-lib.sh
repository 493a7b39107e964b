# Helpers for dom0 test programs (busybox ash): . /usr/lib/brbd/brbd-lib.sh
OUT=/brbd/out
mkdir -p $OUT/scenarios

brbd_now() { read _up _rest < /proc/uptime; echo $_up; }

# brbd_result NAME PASS|FAIL|SKIP SECONDS DETAIL...
brbd_result() { _n=$1 _s=$2 _t=$3; shift 3; echo "BRBD-RESULT $_n $_s $_t $*"; }

# brbd_scenario [-t SECS] NAME FUNC [ARGS]: run FUNC in a subshell (set -e), log to
# $OUT/scenarios/NAME.log, report PASS/FAIL with the time and the log's last line.
# A FUNC exiting 77 reports SKIP.  The BEGIN mark lets the host name a scenario that
# never reported.  A scenario still running after SECS (default BRBD_SCENARIO_LIMIT) has
# hung: it is killed and reported FAIL.  After a FAIL, brbd_after_fail (if the program
# defines it) cleans up, so that the scenarios after it start clean.  BRBD_ONLY (BLOCK_RBD_XEN_ONLY on
# the host: names separated by spaces) runs only those scenarios.
BRBD_SCENARIO_LIMIT=${BRBD_SCENARIO_LIMIT:-300}
brbd_scenario() {
    _limit=$BRBD_SCENARIO_LIMIT
    [ "$1" = -t ] && { _limit=$2; shift 2; }
    _name=$1; shift
    case " ${BRBD_ONLY:-$_name} " in
        *" $_name "*) ;;
        *) brbd_result $_name SKIP 0 "not selected (BLOCK_RBD_XEN_ONLY=$BRBD_ONLY)"; return 0 ;;
    esac
    _log=$OUT/scenarios/$_name.log
    _t0=$(brbd_now)
    echo "BRBD-SCENARIO-BEGIN $_name $_t0"
    ( set -e; "$@" ) > $_log 2>&1 &
    _pid=$!
    rm -f /run/brbd-scenario.hung
    ( sleep $_limit; touch /run/brbd-scenario.hung; brbd_kill_tree $_pid ) > /dev/null 2>&1 &
    _dog=$!
    wait $_pid
    _rc=$?
    brbd_kill_tree $_dog
    _t1=$(brbd_now)
    _secs=$(awk "BEGIN{printf \"%.2f\", $_t1-$_t0}")
    if [ -e /run/brbd-scenario.hung ]; then
        rm -f /run/brbd-scenario.hung
        echo "block-rbd gate: $_name still running after $_limit s: killed" >> $_log
        brbd_result $_name FAIL $_secs "hung: still running after $_limit s, killed ($(tail -n 2 $_log | head -n 1 | tr '\t\r' '  ' | cut -c1-150))"
        echo "---- $_log (tail) ----"; tail -n 25 $_log; echo "----"
        brbd_cleanup_after $_name
        return 0
    fi
    _detail=$(tail -n 1 $_log | tr '\t\r' '  ' | cut -c1-200)
    case $_rc in
        0) brbd_result $_name PASS $_secs "$_detail" ;;
        77) brbd_result $_name SKIP $_secs "$_detail" ;;
        *) brbd_result $_name FAIL $_secs "rc=$_rc $_detail"
           echo "---- $_log (tail) ----"; tail -n 25 $_log; echo "----"
           brbd_cleanup_after $_name ;;
    esac
    return 0
}

brbd_cleanup_after() {  # $1 scenario
    command -v brbd_after_fail > /dev/null || return 0
    brbd_after_fail > $OUT/scenarios/$1.cleanup.log 2>&1
    echo "after $1: $(tail -n 1 $OUT/scenarios/$1.cleanup.log)"
}

# brbd_kill_tree PID: SIGKILL PID and every process below it (daemons that detached to
# init are not below it: the cleanup after a hang deals with those)
brbd_kill_tree() {
    _kids=$(brbd_descendants $1)
    kill -KILL $1 $_kids 2>/dev/null
}
brbd_descendants() {
    for _c in $(awk -v p=$1 '$4 == p {print $1}' /proc/[0-9]*/stat 2>/dev/null); do
        echo $_c
        brbd_descendants $_c
    done
}

# brbd_timed LABEL CMD...: run CMD, append "LABEL <seconds> rc=<rc>" to $OUT/timings.txt
brbd_timed() {
    _l=$1; shift
    _a=$(brbd_now)
    "$@"
    _r=$?
    _b=$(brbd_now)
    echo "$_l $(awk "BEGIN{printf \"%.2f\", $_b-$_a}") rc=$_r" >> $OUT/timings.txt
    return $_r
}

# brbd_wait_for PATH [TENTHS]: wait until PATH exists
brbd_wait_for() {
    _i=0
    while [ ! -e "$1" ]; do
        _i=$((_i+1)); [ $_i -gt ${2:-100} ] && return 1
        sleep 0.1
    done
}

# brbd_wait_log FILE PATTERN [TENTHS]: wait until a line of FILE matches PATTERN (grep)
brbd_wait_log() {
    _i=0
    until grep -q -- "$2" "$1" 2>/dev/null; do
        _i=$((_i+1)); [ $_i -gt ${3:-100} ] && return 1
        sleep 0.1
    done
}

# brbd_host ACTION ARGS...: have the host do ACTION (host.py's host_action, e.g.
# osd-pause 20, restart-mon); prints the host's reply, fails unless it is "ok ..."
brbd_host() {
    [ -n "$BRBD_CONTROL" ] || { echo "no host control channel in this run"; return 1; }
    _reply=$(echo "$*" | nc $BRBD_CONTROL)
    echo "host $*: ${_reply:-no reply}"
    case "$_reply" in ok*) return 0 ;; *) return 1 ;; esac
}

# The per-host daemons block-rbd ships systemd units for, started the way systemd would
# (no systemd in this dom0).  The service: hotplug runs use it when it answers; a checkout
# without the command skips it.
BRBD_SCRIPT=/etc/xen/scripts/block-rbd
SERVICE_SOCK=/run/block-rbd/hotplug.sock
service_missing() {
    $BRBD_SCRIPT service --help > $OUT/service-help.txt 2>&1 && return 1
    echo "block-rbd service: command missing in this checkout (\`$BRBD_SCRIPT service --help\` failed: $(head -n 1 $OUT/service-help.txt))"
}
service_start() {
    [ -n "$BRBD_SERVICE_MISSING" ] && return 0
    if [ -f /run/brbd-service.pid ] && kill -0 $(cat /run/brbd-service.pid) 2>/dev/null; then return 0; fi
    mkdir -p /run/block-rbd
    # --idle: no systemd here to start it again on demand once it exits idle
    setsid $BRBD_SCRIPT service --socket $SERVICE_SOCK --idle 3600 >> $OUT/service.log 2>&1 < /dev/null &
    echo $! > /run/brbd-service.pid
    brbd_wait_for $SERVICE_SOCK 300 || echo "block-rbd service: no $SERVICE_SOCK after 30 s (see service.log)"
}
service_stop() {
    [ -f /run/brbd-service.pid ] || return 0
    _p=$(cat /run/brbd-service.pid); rm -f /run/brbd-service.pid
    kill -TERM $_p 2>/dev/null || return 0
    _i=0; while kill -0 $_p 2>/dev/null && [ $_i -lt 100 ]; do sleep 0.1; _i=$((_i+1)); done
    ! kill -0 $_p 2>/dev/null || echo "block-rbd service $_p still running 10 s after SIGTERM"
}
# block-rbd upkeep (block-rbd-upkeep.service): it logs where the hotplug runs do
UPKEEP_LOG=/var/log/xen/xen-hotplug.log
upkeep_start() {
    setsid $BRBD_SCRIPT upkeep >> $OUT/upkeep.log 2>&1 < /dev/null &
    echo $! > /run/brbd-upkeep.pid
}
