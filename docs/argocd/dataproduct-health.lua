-- Argo CD health check for datamesh.io/DataProduct (argocd-cm key
-- resource.customizations.health.datamesh.io_DataProduct; see docs/gitops.md).
--
-- Maps the operator's status to Argo CD health, following the kstatus conventions:
--   no status yet, or status.observedGeneration behind metadata.generation -> Progressing
--   phase Failed (a spec error) or Degraded (Qdrant or an endpoint down)    -> Degraded
--   phase Ready with the Ready condition True (or none)                   -> Healthy
--   anything else (Pending, Provisioning, Ready=False or Unknown)          -> Progressing
local hs = {}

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the datamesh operator to report status"
  return hs
end

local status = obj.status
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = nil
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
  end
end

local message = status.message
if (message == nil or message == "") and ready ~= nil then
  message = ready.message
end
if message == nil or message == "" then
  message = "no message"
end

local phase = status.phase
if phase == "Failed" or phase == "Degraded" then
  hs.status = "Degraded"
  hs.message = phase .. ": " .. message
  return hs
end

local readyTrue = ready ~= nil and ready.status == "True"
if (phase == "Ready" and (ready == nil or readyTrue)) or (phase == nil and readyTrue) then
  hs.status = "Healthy"
  if status.records ~= nil then
    hs.message = "Ready: " .. tostring(status.records) .. " records"
  else
    hs.message = "Ready"
  end
  return hs
end

hs.status = "Progressing"
hs.message = (phase or "Pending") .. ": " .. message
return hs
