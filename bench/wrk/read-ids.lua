-- wrk script: GET one Observation by id per request, rotating over many ids.
--
--   wrk -t2 -c64 -d10s --latency -s bench/wrk/read-ids.lua http://HOST:PORT \
--       -- IDS_FILE PATH_PREFIX [TOKEN]
--
-- IDS_FILE has one id a line (bench/load-observations.py writes it);
-- PATH_PREFIX is e.g. /fhir/Observation/ (clinflow) or /Observation/ (hfs).
-- Each thread starts at its own offset so the threads read different rows.

local threads = 0

function setup(thread)
    thread:set("thread_no", threads)
    threads = threads + 1
end

local paths, n, i = {}, 0, 0

function init(args)
    local file, prefix, token = args[1], args[2], args[3]
    assert(file and prefix, "usage: -- IDS_FILE PATH_PREFIX [TOKEN]")
    for line in io.lines(file) do
        if line ~= "" then
            n = n + 1
            paths[n] = prefix .. line
        end
    end
    assert(n > 0, "no ids in " .. file)
    wrk.headers["Accept"] = "application/fhir+json"
    if token and token ~= "" then
        wrk.headers["Authorization"] = "Bearer " .. token
    end
    -- thread_no is set by setup() in this thread's Lua state.
    i = ((thread_no or 0) * 7919) % n
end

function request()
    i = i % n + 1
    return wrk.format("GET", paths[i])
end
