-- Argo CD health of a kubetune InferenceService (resource.customizations.health.
-- kubetune.io_InferenceService). Lua 5.1, as Argo CD's gopher-lua runs it.
-- Ready with no rollout in progress is Healthy; a rollout (condition Progressing=True) or a
-- service not yet serving is Progressing; Failed is Degraded.
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
local rolling = false
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Progressing" and condition.status == "True" then
      rolling = true
    end
  end
end
if phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Ready" and not rolling then
  hs.status = "Healthy"
else
  hs.status = "Progressing"
end
return hs
