"""Runs crosslogic/envoy_assets/lua/usage.lua on LuaJIT (Envoy's Lua) behind a stand-in for Envoy's stream handle API.

The stand-in keeps the rules of Envoy's Lua filter that the script depends on (filters/http/lua): a body chunk
is usable only while Envoy holds it (until the iterator asks for the next one, or a call yields); the end-of-
stream chunk is still held after the `bodyChunks()` loop ends; `httpCall` yields, so the chunk held at that
moment goes on only after the call. What it records: each chunk as it left, the calls and which chunk was
held during each, the metadata. The real filter in Envoy is exercised by the gateway tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lupa import luajit21

from crosslogic.xds.resources import usage_filter_source

_HARNESS = r"""
local function buffer(data)
  local b = {data = data, dead = false}
  function b:length() return #self.data end
  function b:getBytes(i, n)
    assert(not self.dead, "a body chunk used after Envoy let it go")
    assert(i >= 0 and i + n <= #self.data, "getBytes out of range")
    return self.data:sub(i + 1, i + n)
  end
  function b:setBytes(s)
    assert(not self.dead, "a body chunk used after Envoy let it go")
    self.data = s
  end
  return b
end

-- Header and metadata objects, like Envoy's wrappers, are valid only until the script next yields.
local generation = 0
local function wrapper(methods)
  local born = generation
  local object = {}
  for name, f in pairs(methods) do
    object[name] = function(self, ...)
      assert(born == generation, "object used outside of proper scope")
      return f(...)
    end
  end
  return object
end

function run_response(header_table, chunk_list, metadata, call_status, arrive_during_call)
  local record = {calls = {}, chunks = {}, body = nil}
  local handle = {}
  local current, streamed = 0, false
  local chunks = record.chunks
  local function yield()
    generation = generation + 1
    if current > 0 then chunks[current].dead = true end  -- Envoy sends the held chunk on (or buffers it)
  end
  function handle:headers()
    return wrapper({get = function(k) return header_table[k] end,
                    replace = function(k, v) header_table[k] = v end,
                    remove = function(k) header_table[k] = nil end})
  end
  function handle:streamInfo()
    return wrapper({dynamicMetadata = function()
      return wrapper({get = function(ns) return metadata[ns] end,
                      set = function(ns, k, v)
                        if metadata[ns] == nil then metadata[ns] = {} end
                        metadata[ns][k] = v
                      end})
    end})
  end
  function handle:bodyChunks()
    assert(not streamed, "bodyChunks called twice")
    streamed = true
    return function()
      if current >= #chunk_list then return nil end  -- end of stream seen: the last chunk stays held
      yield()
      current = current + 1
      chunks[current] = buffer(chunk_list[current])
      return chunks[current]
    end
  end
  function handle:body(always)
    assert(not streamed, "body() after bodyChunks()")
    yield()  -- waits for the whole body
    record.body = buffer(table.concat(chunk_list))
    return record.body
  end
  function handle:httpCall(cluster, call_headers, body, timeout)
    record.calls[#record.calls + 1] = {cluster = cluster, path = call_headers[":path"],
                                       method = call_headers[":method"], body = body, held = current,
                                       timeout = timeout}
    yield()  -- the call yields: the held chunk is no longer ours
    if record.body ~= nil then record.body.dead = true end
    if arrive_during_call then
      -- The rest of the stream arrives while the call is in flight: Envoy buffers it and sends it on after
      -- the call without showing it to the script (filters/http/lua: onData in state HttpCall).
      while current < #chunk_list do
        current = current + 1
        chunks[current] = buffer(chunk_list[current])
        chunks[current].dead = true
      end
    end
    return {[":status"] = call_status}, '{"released": 1}'
  end
  envoy_on_response(handle)
  return record
end

function run_request(header_table, body, metadata)
  local headers = {t = header_table}
  function headers:get(k) return self.t[k] end
  local meta = {t = metadata}
  function meta:set(ns, k, v)
    if self.t[ns] == nil then self.t[ns] = {} end
    self.t[ns][k] = v
  end
  local info = {}
  function info:dynamicMetadata() return meta end
  local buf = body and buffer(body) or nil
  local handle = {}
  function handle:headers() return headers end
  function handle:streamInfo() return info end
  function handle:body() return buf end
  envoy_on_request(handle)
  return buf and buf.data or nil
end
"""


@dataclass
class Call:
    cluster: str
    method: str
    path: str
    body: str
    held: int  # 1-based index of the chunk Envoy held during the call (0: none yet)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    chunks: list[bytes]  # as they left the filter
    calls: list[Call]
    usage: dict = field(default_factory=dict)  # dynamic metadata crosslogic.usage

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def sent_before(self, call: Call) -> bytes:
        """What the client could have received before the call: the chunks Envoy let go before it."""
        return b"".join(self.chunks[:max(0, call.held - 1)])

    def json(self) -> dict:
        return json.loads(self.body)


def _lua_value(lua, value):
    if isinstance(value, dict):
        return lua.table_from({k.encode(): _lua_value(lua, v) for k, v in value.items()})
    if isinstance(value, str):
        return value.encode()
    return value


def _py(value):
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "items"):
        return {_py(k): _py(v) for k, v in value.items()}
    return value


class UsageFilter:
    """One LuaJIT state with the filter loaded, as one Envoy worker has."""

    def __init__(self) -> None:
        self.lua = luajit21.LuaRuntime(unpack_returned_tuples=True, encoding=None)
        self.lua.execute(usage_filter_source().encode())  # the text xDS sends Envoy
        self.lua.execute(_HARNESS.encode())

    def respond(self, status: int, content_type: str | None, chunks: list[bytes], mode: str | None = "json",
                authz: dict | None = None, extra_headers: dict[str, str] | None = None,
                release_status: str = "200", arrive_during_call: bool = False) -> Response:
        headers = {":status": str(status), **(extra_headers or {})}
        if content_type is not None:
            headers["content-type"] = content_type
        metadata: dict = {}
        if mode is not None:
            metadata["crosslogic.usage"] = {"mode": mode}
        if authz is not None:
            metadata["envoy.filters.http.ext_authz"] = authz
        lua_headers = _lua_value(self.lua, headers)
        lua_meta = _lua_value(self.lua, metadata)
        record = self.lua.globals().run_response(lua_headers, self.lua.table_from(list(chunks)), lua_meta,
                                                 release_status.encode(), arrive_during_call)
        out_headers = _py(dict(lua_headers.items()))
        if record.body is not None:
            sent = [record.body.data]
        else:
            sent = [record.chunks[i].data for i in range(1, len(record.chunks) + 1)]
        calls = [Call(*(_py(c[k]) for k in (b"cluster", b"method", b"path", b"body", b"held")))
                 for c in (record.calls[i] for i in range(1, len(record.calls) + 1))]
        usage = lua_meta[b"crosslogic.usage"]
        usage = _py(dict(usage.items())) if usage is not None else {}
        return Response(int(out_headers[":status"]), out_headers, sent, calls, usage)

    def request(self, headers: dict[str, str], body: bytes | None) -> tuple[bytes | None, dict]:
        meta = self.lua.table_from({})
        out = self.lua.globals().run_request(_lua_value(self.lua, headers), body, meta)
        return out, _py(dict(meta.items()))
