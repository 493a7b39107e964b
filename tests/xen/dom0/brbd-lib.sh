# Helpers for dom0 test programs (busybox ash): . /usr/lib/brbd/brbd-lib.sh
OUT=/brbd/out
mkdir -p $OUT/scenarios

brbd_now() { read _up _rest < /proc/uptime; echo $_up; }

# brbd_result NAME PASS|FAIL|SKIP SECONDS DETAIL...
brbd_result() { _n=$1 _s=$2 _t=$3; shift 3; echo "BRBD-RESULT $_n $_s $_t $*"; }

# brbd_scenario NAME FUNC [ARGS]: run FUNC in a subshell (set -e), log to
# $OUT/scenarios/NAME.log, report PASS/FAIL with the time and the log's last line.
# A FUNC exiting 77 reports SKIP.  The BEGIN mark lets the host name a scenario that
# never reported (hung until the run's timeout).  BRBD_ONLY (BLOCK_RBD_XEN_ONLY on the
# host: names separated by spaces) runs only those scenarios.
brbd_scenario() {
    _name=$1; shift
    case " ${BRBD_ONLY:-$_name} " in
        *" $_name "*) ;;
        *) brbd_result $_name SKIP 0 "not selected (BLOCK_RBD_XEN_ONLY=$BRBD_ONLY)"; return 0 ;;
    esac
    _log=$OUT/scenarios/$_name.log
    _t0=$(brbd_now)
    echo "BRBD-SCENARIO-BEGIN $_name $_t0"
    ( set -e; "$@" ) > $_log 2>&1
    _rc=$?
    _t1=$(brbd_now)
    _secs=$(awk "BEGIN{printf \"%.2f\", $_t1-$_t0}")
    _detail=$(tail -n 1 $_log | tr '\t\r' '  ' | cut -c1-200)
    case $_rc in
        0) brbd_result $_name PASS $_secs "$_detail" ;;
        77) brbd_result $_name SKIP $_secs "$_detail" ;;
        *) brbd_result $_name FAIL $_secs "rc=$_rc $_detail"
           echo "---- $_log (tail) ----"; tail -n 25 $_log; echo "----" ;;
    esac
    return 0
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

# brbd_host ACTION ARGS...: have the host do ACTION (host.py's host_action, e.g.
# osd-pause 20, restart-mon); prints the host's reply, fails unless it is "ok ..."
brbd_host() {
    [ -n "$BRBD_CONTROL" ] || { echo "no host control channel in this run"; return 1; }
    _reply=$(echo "$*" | nc $BRBD_CONTROL)
    echo "host $*: ${_reply:-no reply}"
    case "$_reply" in ok*) return 0 ;; *) return 1 ;; esac
}
