-- The response path of every pooled request (DESIGN.md §4), in one Envoy Lua filter:
--   * usage accounting: the node's token counts land in dynamic metadata (namespace crosslogic.usage), which
--     the access log carries to the accounting sink;
--   * streams as OpenAI sends them: the node is always asked for cumulative usage on every chunk (so a stream
--     cut mid-way still leaves the tokens generated so far), and the client sees only what it asked for;
--   * node errors in OpenAI's shape (status, type, code; a safe message);
--   * the request's concurrency leases freed as the response ends (ext_authz's POST /release), before the
--     client can see that end.
-- ext_authz says in x-clp-usage-mode how to show the body (extauthz/decision.py):
--   json       non-streaming: read `usage` from the JSON body
--   sse-keep   the client asked for include_usage and vLLM's continuous_usage_stats: chunks as the node sent them
--   sse-null   include_usage only: `"usage": null` on every chunk, then the usage-only final chunk
--   sse-strip  neither: no `usage` on any chunk and no usage-only final chunk
-- NS, AUTHZ_NS, USAGE_MODE_HEADER, RELEASE_CLUSTER, RELEASE_PATH, LEASE_KEY and the MODE_* names are prepended
-- from crosslogic/contract.py (contract.lua_constants()).
-- Appended as the last key: the node's JSON parser keeps the last duplicate, so ours wins.
local FORCED_STREAM_OPTIONS = ',"stream_options":{"include_usage":true,"continuous_usage_stats":true}'
local RELEASE_HEADERS = {[":method"] = "POST", [":path"] = RELEASE_PATH, [":authority"] = "crosslogic-release",
                         ["content-type"] = "application/json"}
local RELEASE_TIMEOUT_MS = 1000  -- per attempt; then settlement frees the lease (admission waits for it meanwhile)
local RELEASE_ATTEMPTS = 2  -- a hung ext_authz delays a response end by at most RELEASE_ATTEMPTS x the timeout
local MAX_CARRY = 1048576  -- bytes of one unfinished SSE event held back; a bigger one passes on as it came
local ERROR_READ_LIMIT = 65536  -- bytes of a node's error body looked at
local MAX_MESSAGE = 512  -- bytes of a node's error message passed on to the client

function envoy_on_request(handle)
  local mode = handle:headers():get(USAGE_MODE_HEADER)
  if mode == nil then
    return
  end
  handle:streamInfo():dynamicMetadata():set(NS, "mode", mode)
  if mode == MODE_JSON then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local raw = body:getBytes(0, body:length())
  local close = raw:match(".*()}")
  if close ~= nil then
    body:setBytes(raw:sub(1, close - 1) .. FORCED_STREAM_OPTIONS .. raw:sub(close))
  end
end

-- ------------------------------------------------------------------------------------------ JSON text

local function escape_char(c)
  if c == '"' then return '\\"' end
  if c == "\\" then return "\\\\" end
  return string.format("\\u%04x", c:byte())
end

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', escape_char) .. '"'
end

-- The raw (still JSON-escaped) text of the first string value of `key` in the JSON text s, or nil.
local function string_value(s, key)
  local _, colon = s:find('"' .. key .. '"%s*:%s*"')
  if colon == nil then
    return nil
  end
  local i, n = colon + 1, #s
  while i <= n do
    local c = s:byte(i)
    if c == 92 then
      i = i + 2
    elseif c == 34 then
      return s:sub(colon + 1, i - 1)
    else
      i = i + 1
    end
  end
  return nil
end

-- Where the object starting at s[from] ("{") ends, strings skipped; nil if it does not end in s.
local function object_end(s, from)
  local depth, i, n = 0, from, #s
  while i <= n do
    local c = s:byte(i)
    if c == 123 then
      depth = depth + 1
    elseif c == 125 then
      depth = depth - 1
      if depth == 0 then
        return i
      end
    elseif c == 34 then
      i = i + 1
      while i <= n do
        local d = s:byte(i)
        if d == 92 then
          i = i + 1
        elseif d == 34 then
          break
        end
        i = i + 1
      end
    end
    i = i + 1
  end
  return nil
end

-- The last number of `"key": <digits>` in text (a whole JSON body, seen chunk by chunk).
local function last_number(text, key)
  local found = nil
  for digits in text:gmatch('"' .. key .. '"%s*:%s*(%d+)') do
    found = digits
  end
  return found
end

-- ------------------------------------------------------------------------------------------ node errors

local OPENAI_TYPES = {invalid_request_error = true, authentication_error = true, permission_error = true,
                      not_found_error = true, rate_limit_error = true, server_error = true,
                      insufficient_quota = true}
local VALID_ESCAPES = {[34] = true, [92] = true, [47] = true, [98] = true, [102] = true, [110] = true,
                       [114] = true, [116] = true}

-- Escaped JSON string text made safe to show: no stack trace, no addresses, valid escapes, at most `limit` bytes
-- (cut on a character boundary).
local function safe_text(raw, limit)
  local cut = raw:find("Traceback", 1, true)
  if cut ~= nil then
    raw = raw:sub(1, cut - 1)
  end
  raw = raw:gsub("https?://[^%s\"\\]+", "[address]")
  raw = raw:gsub("%[[%x:]*:[%x:]*%]:?%d*", "[address]")
  raw = raw:gsub("%d+%.%d+%.%d+%.%d+:?%d*", "[address]")
  raw = raw:gsub("[%w%-]+%.[%w%.%-]*%a[%w%-]*:%d+", "[address]")
  raw = raw:gsub("localhost:%d+", "[address]")
  local out, i, n, size = {}, 1, #raw, 0
  while i <= n do
    local c = raw:byte(i)
    local piece
    if c == 92 then
      local e = raw:byte(i + 1)
      if e == 117 and raw:sub(i + 2, i + 5):match("^%x%x%x%x$") then
        piece = raw:sub(i, i + 5)
      elseif e ~= nil and VALID_ESCAPES[e] then
        piece = raw:sub(i, i + 1)
      else
        piece = "\\\\"  -- a stray backslash shown as itself
        i = i - 1
      end
      i = i + #piece
    elseif c < 32 or c == 34 then
      piece = " "
      i = i + 1
    elseif c < 128 then
      piece = string.char(c)
      i = i + 1
    else  -- one UTF-8 sequence, whole, or "?" for bytes that are none
      local len = c >= 248 and 0 or c >= 240 and 4 or c >= 224 and 3 or c >= 192 and 2 or 0
      piece = raw:sub(i, i + len - 1)
      if len == 0 or #piece < len or not piece:sub(2):match("^[\128-\191]*$") then
        piece, len = "?", 1
      end
      i = i + len
    end
    if size + #piece > limit then
      out[#out + 1] = "..."
      break
    end
    out[#out + 1] = piece
    size = size + #piece
  end
  return (table.concat(out):gsub("^%s+", ""):gsub("%s+$", ""))
end

-- What the client sees for a node's error of HTTP status `status` (or an error event's code): OpenAI's
-- vocabulary, 4xx kept with the node's (safe) message, 5xx as our own words.
local function mapped_error(status, message, param)
  if status == 404 then
    return 404, "invalid_request_error", param == "model" and "model_not_found" or "not_found",
           message or "The requested resource was not found.", param
  end
  if status == 413 then
    return 413, "invalid_request_error", "request_too_large", "Request body is too large.", nil
  end
  if status == 429 then  -- the node is overloaded: retryable, like the platform's own shedding
    return 429, "server_error", "server_busy", "The model server is busy right now. Please retry after 1 s.", nil
  end
  if status >= 400 and status < 500 and status ~= 401 and status ~= 403 and status ~= 407 then
    return status, "invalid_request_error", "invalid_request_error",
           message or "The model server rejected the request.", param
  end
  if status == 503 then
    return 503, "server_error", "service_unavailable",
           "No capacity is available for this model right now. Please retry.", nil
  end
  if status == 504 then
    return 504, "server_error", "timeout", "The model took too long to answer. Please retry.", nil
  end
  -- 5xx, the node's own authentication (ours to fix, not the client's), or no answer a model server gives
  return 502, "server_error", "bad_gateway", "The model server failed to process the request. Please retry.", nil
end

-- (status, OpenAI error JSON) for a node's error body `raw` (JSON text, or "" when it is not JSON).
local function openai_error(status, raw)
  local object = raw
  local _, open = raw:find('"error"%s*:%s*{')
  if open ~= nil then
    object = raw:sub(open, object_end(raw, open) or #raw)
  end
  local message = string_value(object, "message") or string_value(object, "detail")
  local param = string_value(object, "param")
  local error_type = string_value(object, "type")
  local code = string_value(object, "code")
  if message ~= nil then
    message = safe_text(message, MAX_MESSAGE)
    if message == "" then message = nil end
  end
  if param ~= nil then
    param = safe_text(param, 64)
  end
  local new_status, new_type, new_code
  if error_type ~= nil and OPENAI_TYPES[error_type] and (code ~= nil or object:find('"code"%s*:%s*null'))
      and status >= 400 and status < 600 then
    -- already OpenAI's shape (Envoy's own replies, mapped by local_reply_config): keep its words
    new_status, new_type, new_code = status, error_type, code and safe_text(code, 64)
    message = message or "The request failed."
  else
    new_status, new_type, new_code, message, param = mapped_error(status, message, param)
  end
  local body = '{"error":{"message":"' .. message .. '","type":"' .. new_type .. '","param":'
               .. (param and ('"' .. param .. '"') or "null") .. ',"code":'
               .. (new_code and ('"' .. new_code .. '"') or "null") .. '}}'
  return new_status, body
end

-- Replaces a non-2xx (or non-model) response with OpenAI's error JSON.
local function replace_error(handle, status)
  local content_type = handle:headers():get("content-type") or ""
  local body = handle:body(true)
  local headers = handle:headers()  -- fresh: body() yielded, and wrappers do not survive a yield
  local raw = ""
  local size = body:length()
  if size > 0 and content_type:find("json", 1, true) then
    raw = body:getBytes(0, math.min(size, ERROR_READ_LIMIT))
  end
  local new_status, json = openai_error(status, raw)
  body:setBytes(json)
  headers:replace(":status", tostring(new_status))
  headers:replace("content-type", "application/json")
  headers:remove("content-encoding")
  if new_status == 429 then
    headers:replace("retry-after", "1")
  end
end

-- ------------------------------------------------------------------------------------------ leases

-- The body of the POST /release call for a request whose admission took concurrency leases, else nil.
local function release_request(authz)
  if authz == nil or type(authz[LEASE_KEY]) ~= "string" then
    return nil
  end
  local fields = {'"request_id":' .. json_string(authz[LEASE_KEY])}
  for _, key in ipairs({"org_id", "env_id", "key_id", "region"}) do
    local value = authz[key]
    if type(value) ~= "string" then
      return nil
    end
    fields[#fields + 1] = '"' .. key .. '":' .. json_string(value)
  end
  return "{" .. table.concat(fields, ",") .. "}"
end

-- Frees the leases while the caller holds the response's last bytes (the call yields; Envoy buffers them).
-- A call answered other than 200 (ext_authz's Valkey call timed out: 503; the connection was lost) is made once
-- more: it is idempotent, and a lease left behind makes the client's next request wait for settlement.
local function release(handle, body)
  if body == nil then
    return
  end
  for _ = 1, RELEASE_ATTEMPTS do
    local ok, headers = pcall(handle.httpCall, handle, RELEASE_CLUSTER, RELEASE_HEADERS, body, RELEASE_TIMEOUT_MS)
    if ok and headers ~= nil and headers[":status"] == "200" then
      return
    end
  end
  -- Still failed: changes nothing for the client; settlement frees the lease a little later.
end

-- ------------------------------------------------------------------------------------------ streams

-- Where the SSE event starting at `from` ends: (first, last) byte of its blank line, or nil.
local function event_end(s, from, crlf)
  local a, b = s:find("\n\n", from, true)
  if crlf then
    local c, d = s:find("\r\n\r\n", from, true)
    if c ~= nil and (a == nil or c < a) then
      return c, d
    end
  end
  return a, b
end

-- The `"usage": <value>` member of a chunk: (key start, value start, value end, is an object), or nil.
local function usage_member(p)
  local key, colon = p:find('"usage"%s*:%s*')
  if key == nil then
    return nil
  end
  local from = colon + 1
  if p:byte(from) == 123 then
    local stop = object_end(p, from)
    if stop ~= nil then
      return key, from, stop, true
    end
  elseif p:sub(from, from + 3) == "null" then
    return key, from, from + 3, false
  end
  return nil
end

-- p without the member spanning [key, stop] and the comma that joins it to its neighbour.
local function without_member(p, key, stop)
  local j = key - 1
  while j > 0 and p:byte(j) <= 32 do
    j = j - 1
  end
  if p:byte(j) == 44 then  -- ",": a member before it
    return p:sub(1, j - 1) .. p:sub(stop + 1)
  end
  local k = stop + 1
  while p:byte(k) ~= nil and p:byte(k) <= 32 do
    k = k + 1
  end
  if p:byte(k) == 44 then
    k = k + 1
  end
  return p:sub(1, key - 1) .. p:sub(k)
end

-- One data payload: records its usage; returns the payload to send (nil: drop the event), whether the node
-- has finished generating, whether this is the stream's end ([DONE]).
local function rewrite_payload(p, mode, usage)
  if p == "[DONE]" then
    return p, true, true
  end
  if p:byte(1) ~= 123 then
    return p, false, false
  end
  if p:find('^{%s*"error"%s*:') then  -- vLLM's error event (the stream failed after its headers were sent)
    local code = tonumber(p:match('"code"%s*:%s*(%d+)')) or 500
    local _, json = openai_error(code, p)
    return json, true, false
  end
  local empty_choices = p:find('"choices"%s*:%s*%[%s*%]') ~= nil
  local key, from, stop, is_object = usage_member(p)
  if is_object then
    local object = p:sub(from, stop)
    local prompt = tonumber(object:match('"prompt_tokens"%s*:%s*(%d+)'))
    local completion = tonumber(object:match('"completion_tokens"%s*:%s*(%d+)'))
    if empty_choices then  -- the usage-only final chunk: the request's totals
      usage.final_prompt, usage.final_completion = prompt, completion
    else  -- cumulative per choice (vLLM counts each choice's tokens on its own chunks)
      local index = tonumber(p:match('"choices"%s*:%s*%[%s*{%s*"index"%s*:%s*(%d+)')) or 0
      usage.prompt = prompt or usage.prompt
      if completion ~= nil then
        usage.per_choice[index] = completion
      end
    end
  end
  if mode == MODE_SSE_STRIP then
    if empty_choices then
      return nil, true, false
    end
    if key ~= nil then
      p = without_member(p, key, stop)
    end
  elseif mode == MODE_SSE_NULL and not empty_choices then
    if key ~= nil then
      p = p:sub(1, from - 1) .. "null" .. p:sub(stop + 1)
    elseif p:byte(-1) == 125 then
      p = p:sub(1, -2) .. ',"usage":null}'
    end
  end
  return p, empty_choices, false
end

-- Rewrites the complete events of s. Returns (what to send now, what to hold back, the unfinished rest,
-- [DONE] seen). Once an event says the node finished generating (the usage-only chunk, an error event), it
-- and everything after it are held back until [DONE]: the release runs while [DONE] is held, and it must be
-- the last event, because body data that arrives while the release call is in flight goes on without
-- passing through this script (Envoy buffers it for us, and never shows it to the script).
local function rewrite_events(s, mode, usage, holding)
  local now, later, pos, done = {}, {}, 1, false
  local crlf = s:find("\r", 1, true) ~= nil
  while true do
    local blank, stop = event_end(s, pos, crlf)
    if blank == nil then
      break
    end
    local text
    local payload = s:sub(pos, blank - 1):match("^data: ?(.*)$")
    if payload == nil or payload:find("\n", 1, true) then  -- not one data line: not ours to change
      text = s:sub(pos, stop)
    else
      local sent, over, is_done = rewrite_payload(payload, mode, usage)
      holding = holding or over
      done = done or is_done
      text = sent and ("data: " .. sent .. s:sub(blank, stop)) or ""
    end
    if holding then
      later[#later + 1] = text
    else
      now[#now + 1] = text
    end
    pos = stop + 1
  end
  return table.concat(now), table.concat(later), s:sub(pos), done, holding
end

local function totals(usage)
  if usage.final_prompt ~= nil or usage.final_completion ~= nil then
    return usage.final_prompt, usage.final_completion
  end
  local completion = nil
  for _, n in pairs(usage.per_choice) do
    completion = (completion or 0) + n
  end
  return usage.prompt, completion
end

-- Streams the events through one by one, holding back only an unfinished event (it may be split across body
-- chunks anywhere) and the end of the generation until [DONE]; frees the leases while [DONE] is held.
local function stream_body(handle, mode, lease)
  local usage = {per_choice = {}}
  local shown_prompt, shown_completion = nil, nil
  local pending, held, holding = "", "", false
  local finished, released = false, lease == nil
  local last, last_sent = nil, ""
  for chunk in handle:bodyChunks() do
    local size = chunk:length()
    local data = size > 0 and chunk:getBytes(0, size) or ""
    local carried = pending
    local sent, later, rest, done
    sent, later, rest, done, holding = rewrite_events(carried .. data, mode, usage, holding)
    held = held .. later
    if #rest > MAX_CARRY or #held > MAX_CARRY then  -- no longer a model's stream: let it all go
      sent, held, rest = sent .. held .. rest, "", ""
    end
    if done then
      sent, held = sent .. held, ""
    end
    pending = rest
    if carried ~= "" or rest ~= "" or sent ~= data then
      chunk:setBytes(sent)
    end
    last, last_sent = chunk, sent
    finished = finished or done
    local prompt, completion = totals(usage)
    if prompt ~= shown_prompt or completion ~= shown_completion then
      -- Fetch the metadata object fresh: the coroutine yielded while waiting for this chunk.
      local meta = handle:streamInfo():dynamicMetadata()
      if prompt ~= nil and prompt ~= shown_prompt then
        meta:set(NS, "prompt_tokens", prompt)
      end
      if completion ~= nil and completion ~= shown_completion then
        meta:set(NS, "completion_tokens", completion)
      end
      shown_prompt, shown_completion = prompt, completion
    end
    if done then
      handle:streamInfo():dynamicMetadata():set(NS, "finished", true)
      if not released then
        released = true
        release(handle, lease)
        last = nil  -- this chunk is gone once the call yielded
      end
    end
  end
  if held ~= "" or pending ~= "" then
    -- The stream ended without [DONE], or inside an event: its bytes go on as they came (a client drops an
    -- unfinished event).
    if last ~= nil then
      pcall(last.setBytes, last, last_sent .. held .. pending)
    end
  end
  if not finished then
    handle:streamInfo():dynamicMetadata():set(NS, "finished", false)
  end
  if not released then  -- ended without [DONE]: still holding the last chunk
    release(handle, lease)
  end
end

-- A non-streamed body passes untouched; its usage is read as it goes by.
local function json_body(handle)
  local tail = ""
  local prompt, completion = nil, nil
  for chunk in handle:bodyChunks() do
    local size = chunk:length()
    if size > 0 then
      local text = tail .. chunk:getBytes(0, size)
      local p = last_number(text, "prompt_tokens")
      local c = last_number(text, "completion_tokens")
      tail = text:sub(-256)
      local meta = handle:streamInfo():dynamicMetadata()
      if p ~= nil and p ~= prompt then
        prompt = p
        meta:set(NS, "prompt_tokens", tonumber(p))
      end
      if c ~= nil and c ~= completion then
        completion = c
        meta:set(NS, "completion_tokens", tonumber(c))
      end
    end
  end
  handle:streamInfo():dynamicMetadata():set(NS, "finished", true)
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata()
  local ns = meta:get(NS)
  if ns == nil or ns["mode"] == nil then
    return
  end
  local lease = release_request(meta:get(AUTHZ_NS))
  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 502
  local content_type = headers:get("content-type") or ""
  if status < 200 or status > 299 then
    replace_error(handle, status)
  elseif content_type:find("text/event-stream", 1, true) then
    stream_body(handle, ns["mode"], lease)
    return
  elseif content_type:find("json", 1, true) then
    json_body(handle)
  else  -- a 2xx that is neither JSON nor a stream is no model server's answer
    replace_error(handle, 502)
  end
  release(handle, lease)  -- the body's last chunk (or the whole error body) is still held here
end
