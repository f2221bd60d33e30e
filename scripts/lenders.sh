# Shared by the scripts in this directory (source it): three memory-servers on 127.0.0.1 ports
# PORTS[0..2], started with LENDER_ARGS, their output in WORK, killed on exit.
# Needs: BIN, WORK, PORTS (array), LENDER_ARGS (array).

declare -a PIDS

# start_lender I: starts lender I and waits for its `listening on` line.
start_lender() {
  local i=$1 out="$WORK/lender-$1.out"
  : >"$out"
  "$BIN/memory-server" --listen "127.0.0.1:${PORTS[$i]}" "${LENDER_ARGS[@]}" >"$out" 2>>"$WORK/lender-$i.log" &
  PIDS[$i]=$!
  for _ in $(seq 200); do
    grep -q "listening on" "$out" && return 0
    kill -0 "${PIDS[$i]}" 2>/dev/null || break
    sleep 0.05
  done
  echo "lender $i did not start on port ${PORTS[$i]} (see $WORK/lender-$i.log)" >&2
  exit 2
}

stop_all() {
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_all EXIT
