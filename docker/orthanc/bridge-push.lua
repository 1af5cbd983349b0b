-- Orthanc pushes each stable study to the FHIR-DICOMweb bridge (POST /studies/{uid}/sync).
--
-- Install: copy this file next to orthanc.json, list it in "LuaScripts", and add a section
--
--   "BridgePush" : {
--     "Url" : "https://bridge.example.org",   -- the bridge's API, without a trailing slash
--     "ApiKey" : "one of BRIDGE_API_KEYS"      -- sent as X-API-Key; leave out if the API needs none
--   }
--
-- Orthanc calls OnStableStudy once no instance of the study has arrived for "StableAge" seconds.
-- The push asks for an answer at once (Prefer: respond-async): the bridge records it and answers
-- 202, so Orthanc's Lua thread never waits for a sync. A push that fails (the bridge down) is
-- logged here and not repeated: the bridge's scheduled cycle or change feed still finds the study.

local function pushConfiguration()
  local configuration = GetOrthancConfiguration()
  local push = configuration and configuration["BridgePush"]
  if push == nil or push["Url"] == nil or push["Url"] == "" then
    return nil
  end
  return push
end

function OnStableStudy(studyId, tags, metadata)
  local push = pushConfiguration()
  if push == nil then
    print("bridge-push: no BridgePush.Url in the Orthanc configuration; study " .. studyId .. " not pushed")
    return
  end
  local uid = tags["StudyInstanceUID"]
  -- Only a well-formed UID goes into the URL (digits and dots, at most 64 characters).
  if uid == nil or string.len(uid) > 64 or string.match(uid, "^[0-9.]+$") == nil then
    print("bridge-push: study " .. studyId .. " has no usable StudyInstanceUID; not pushed")
    return
  end
  local headers = { ["Prefer"] = "respond-async" }
  if push["ApiKey"] ~= nil and push["ApiKey"] ~= "" then
    headers["X-API-Key"] = push["ApiKey"]
  end
  local url = string.gsub(push["Url"], "/+$", "") .. "/studies/" .. uid .. "/sync"
  local answer = HttpPost(url, "", headers)
  if answer == nil then
    -- The URL carries only the Study Instance UID: no patient data reaches Orthanc's log.
    print("bridge-push: the bridge did not accept the push of study " .. uid)
  end
end
