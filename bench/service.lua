-- bench/service.py's load generator for wrk (one thread): each request is one
-- POST /api/workflows/bench/runs?wait_s=30, which the API answers with the finished run.
-- done() prints one JSON line: the answers, those that were not a succeeded run, wrk's
-- socket errors, the duration and the latency percentiles.

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"input": {"n": 1}}'

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  answered = 0
  failed = 0
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 200 or not string.find(body, '"status":"succeeded"', 1, true) then
    failed = failed + 1
  end
end

function done(summary, latency, requests)
  local answered, failed = 0, 0
  for _, thread in ipairs(threads) do
    answered = answered + thread:get("answered")
    failed = failed + thread:get("failed")
  end
  local errors = summary.errors
  io.write(string.format(
    '{"answered": %d, "failed": %d, "errors": %d, "elapsed_us": %d, "p50_us": %d, "p95_us": %d}\n',
    answered, failed, errors.connect + errors.read + errors.write + errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(95)))
end
