-- wrk script: GET /sites/{id} rotating over site-001 .. site-N.
--
--   wrk -t2 -c64 -d10s --latency -s bench/wrk/site-ids.lua http://HOST:PORT -- N [TOKEN]
--
-- Each thread starts at its own offset so the threads read different sites.

local threads = 0

function setup(thread)
    thread:set("thread_no", threads)
    threads = threads + 1
end

local paths, n, i = {}, 0, 0

function init(args)
    n = tonumber(args[1] or "1000")
    local token = args[2]
    for k = 1, n do
        paths[k] = string.format("/sites/site-%03d", k)
    end
    if token and token ~= "" then
        wrk.headers["Authorization"] = "Bearer " .. token
    end
    i = ((thread_no or 0) * 499) % n
end

function request()
    i = i % n + 1
    return wrk.format("GET", paths[i])
end
