// SMART App Launch, EHR launch only: the EHR opens /app/launch?iss=<FHIR base>&launch=<id>.
// fhirclient discovers the authorization server, makes the PKCE challenge (required) and
// redirects. Anything else (no iss/launch, a "fhirServiceUrl" open-server launch, a
// "clientId" in the link) is refused here, and cellcds would refuse it anyway: its API needs the EHR-signed id_token.
const status = document.getElementById('launch-status');
// What this launch was started with: the tenant cellcds resolved and the client id it chose.
// app.mjs checks it against fhirclient's state at the callback (same tab, sessionStorage).
const LAUNCH_KEY = 'cellcds.app.launch';

function fail(text) {
  status.textContent = text;
  status.classList.add('error');
}

// fhirclient lets these URL parameters override the options it is given (the client id
// cellcds chose, an open-server launch, the patient): a launch link carrying any is refused.
const OVERRIDES = ['clientId', 'fhirServiceUrl', 'patientId', 'encounterId'];

async function launch() {
  const params = new URLSearchParams(window.location.search);
  if (OVERRIDES.some((name) => params.has(name))) {
    fail(
      `Open this app from your EHR: this link carries ${OVERRIDES.filter((n) => params.has(n)).join(', ')}, which the card viewer does not take from a link.`,
    );
    return;
  }
  const iss = params.get('iss');
  const launchId = params.get('launch');
  if (!iss || !launchId) {
    fail('Open this app from your EHR: the launch needs the "iss" and "launch" parameters.');
    return;
  }
  const tenant = params.get('tenant');
  sessionStorage.removeItem(LAUNCH_KEY);
  // The client id is the launching tenant's (registered per health system), chosen by cellcds
  // from the launch's iss (and tenant hint): never from the URL.
  const query = new URLSearchParams({ iss, ...(tenant ? { tenant } : {}) });
  let config;
  try {
    const res = await fetch(`/app/api/config?${query}`, { credentials: 'omit', cache: 'no-store' });
    config = await res.json();
    if (!res.ok) {
      fail(`This launch cannot start: ${config.message ?? `HTTP ${res.status}`}`);
      return;
    }
  } catch {
    fail('cellcds could not be reached.');
    return;
  }
  if (!config.configured) {
    fail(
      'The SMART card viewer is not registered for your organisation on this cellcds (no client id). Ask your administrator.',
    );
    return;
  }
  sessionStorage.setItem(
    LAUNCH_KEY,
    JSON.stringify({ iss, clientId: config.clientId, tenant: config.tenant ?? tenant ?? null }),
  );
  try {
    await window.FHIR.oauth2.authorize({
      clientId: config.clientId,
      scope: config.scope,
      redirectUri: new URL('/app/', window.location.href).href,
      iss,
      launch: launchId,
      pkceMode: 'required',
      completeInTarget: true,
    });
  } catch (err) {
    fail(`The launch failed: ${err.message}`);
  }
}

void launch();
