#!/bin/sh
# Smoke: perftest's READ latency on rxe0 against itself.
ib_read_lat -d rxe0 -x 1 -s 4096 -n 2000 >/tmp/lat-server.log 2>&1 &
sleep 1
ib_read_lat -d rxe0 -x 1 -s 4096 -n 2000 10.0.0.1
