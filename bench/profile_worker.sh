#!/usr/bin/env bash
# Profile one worker draining N queued requests with py-spy (pip install py-spy).
# Usage: bench/profile_worker.sh REDIS_URL [N]   (uses a fresh namespace; Redis must run)
set -euo pipefail
cd "$(dirname "$0")/.."
url=$1; n=${2:-40000}; ns="profile-$$"
PYTHONPATH=. python bench/queue_requests.py "$url" "$ns" "$n"
py-spy record --rate 250 --format raw -o /tmp/lending-profile.txt -- \
  python main.py profiler --redis-url "$url" --namespace "$ns" --log-level warning &
pid=$!
until [ "$(python -c "import redis,sys; print(redis.Redis.from_url('$url').xlen('{$ns}:events'))")" -ge "$n" ]; do sleep 0.5; done
pkill -INT -f "main.py profiler" || true
wait "$pid" || true
python bench/summarize_profile.py /tmp/lending-profile.txt 40
