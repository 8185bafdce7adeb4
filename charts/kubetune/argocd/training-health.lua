-- Argo CD health of a kubetune FineTuneJob or AlignmentJob (resource.customizations.health.
-- kubetune.io_FineTuneJob and kubetune.io_AlignmentJob). Lua 5.1, as Argo CD's gopher-lua runs it.
-- The phase decides; the message is the operator's own (status.message).
hs = { status = "Progressing", message = "waiting for the operator" }
if obj.status == nil or obj.status.phase == nil then
  return hs
end
if obj.metadata ~= nil and obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "the operator has not seen the latest spec yet"
  return hs
end
local phase = obj.status.phase
hs.message = obj.status.message or phase
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
return hs
