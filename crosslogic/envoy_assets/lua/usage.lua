-- Usage accounting in the data path (DESIGN.md §4). ext_authz tells us, in x-clp-usage-mode, how:
--   json       non-streaming: read `usage` from the JSON body
--   sse-keep   streaming, client asked for include_usage: force continuous usage on every chunk
--   sse-strip  streaming, client did not ask: force it anyway, then drop the usage-only final chunk
--              so the client sees exactly what it asked for
-- Usage lands in dynamic metadata (namespace crosslogic.usage), which the access log carries to the
-- accounting sink. With usage on every chunk, a stream cut mid-way still leaves the tokens generated.
local NS = "crosslogic.usage"
-- Appended as the last key: the node's JSON parser keeps the last duplicate, so ours wins.
local FORCED_STREAM_OPTIONS = ',"stream_options":{"include_usage":true,"continuous_usage_stats":true}'

function envoy_on_request(handle)
  local mode = handle:headers():get("x-clp-usage-mode")
  if mode == nil then
    return
  end
  handle:streamInfo():dynamicMetadata():set(NS, "mode", mode)
  if mode == "json" then
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

local function last_number(text, key)
  local found = nil
  for digits in text:gmatch('"' .. key .. '"%s*:%s*(%d+)') do
    found = digits
  end
  return found
end

-- Removes the SSE event that carries `"choices":[]` (vLLM's usage-only chunk) from one body chunk.
local function without_usage_event(s)
  local at = s:find('"choices":[]', 1, true)
  if at == nil then
    return nil
  end
  local start, from = 1, 1
  while true do
    local j = s:find("data:", from, true)
    if j == nil or j > at then
      break
    end
    start, from = j, j + 1
  end
  local stop = s:find("\n\n", at, true)
  if stop == nil then
    return nil
  end
  return s:sub(1, start - 1) .. s:sub(stop + 2)
end

function envoy_on_response(handle)
  local ns = handle:streamInfo():dynamicMetadata():get(NS)
  if ns == nil or ns["mode"] == nil then
    return
  end
  local mode = ns["mode"]
  local strip = mode == "sse-strip"
  local tail = ""
  local prompt, completion = nil, nil
  local finished = false
  for chunk in handle:bodyChunks() do
    local size = chunk:length()
    if size > 0 then
      local s = chunk:getBytes(0, size)
      local text = tail .. s
      local p = last_number(text, "prompt_tokens")
      local c = last_number(text, "completion_tokens")
      if s:find("data: [DONE]", 1, true) then
        finished = true
      end
      if strip then
        local stripped = without_usage_event(s)
        if stripped ~= nil then
          chunk:setBytes(stripped)
        end
      end
      tail = text:sub(-256)
      -- Fetch the metadata object fresh: the coroutine yielded while waiting for this chunk.
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
  if mode == "json" then
    finished = true
  end
  handle:streamInfo():dynamicMetadata():set(NS, "finished", finished)
end
