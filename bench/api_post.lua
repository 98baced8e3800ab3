-- wrk script: POST a lend of one book by one user, each request a user and a book never
-- posted before (so every lend is accepted, from the shelving service), to the URL's path
-- and query (e.g. /v1/lends or /v1/lends?wait=5).
--
--   wrk -t2 -c16 -d15s --latency -s bench/api_post.lua 'http://127.0.0.1:8080/v1/lends?wait=5'
--
-- RUN (environment) keeps runs against the same namespace apart; default: the start time.
local run = os.getenv("RUN") or tostring(os.time())
local threads = {}
local next_thread = 0

function setup(thread)
  next_thread = next_thread + 1
  thread:set("tid", next_thread)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  prefix = run .. "-" .. tid .. "-"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  n = n + 1
  local id = prefix .. n
  return wrk.format(nil, nil, nil, '{"user_id":"u' .. id .. '","book_ids":["b' .. id .. '"]}')
end

function done(summary, latency, requests)
  -- One machine-readable line for bench/api_wrk.sh (wrk's own report comes first).
  io.write(string.format(
    "RESULT requests=%d duration_s=%.3f rps=%.1f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f " ..
    "errors_connect=%d errors_read=%d errors_write=%d errors_status=%d errors_timeout=%d\n",
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
end
