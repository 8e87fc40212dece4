// SMART App Launch, EHR launch only: the EHR opens /app/launch?iss=<FHIR base>&launch=<id>.
// fhirclient discovers the authorization server, makes the PKCE challenge (required) and
// redirects. Anything else (no iss/launch, a "fhirServiceUrl" open-server launch) is refused
// here, and cellcds would refuse it anyway: its API needs the EHR-signed id_token.
const status = document.getElementById('launch-status');
const TENANT_KEY = 'cellcds.app.tenant';

function fail(text) {
  status.textContent = text;
  status.classList.add('error');
}

async function launch() {
  const params = new URLSearchParams(window.location.search);
  const iss = params.get('iss');
  const launchId = params.get('launch');
  if (!iss || !launchId) {
    fail('Open this app from your EHR: the launch needs the "iss" and "launch" parameters.');
    return;
  }
  let config;
  try {
    const res = await fetch('/app/api/config', { credentials: 'omit', cache: 'no-store' });
    config = await res.json();
  } catch {
    fail('cellcds could not be reached.');
    return;
  }
  if (!config.configured) {
    fail(
      'The SMART card viewer is not configured on this cellcds (no client id). Ask your administrator.',
    );
    return;
  }
  const tenant = params.get('tenant');
  if (tenant) {
    sessionStorage.setItem(TENANT_KEY, tenant);
  } else {
    sessionStorage.removeItem(TENANT_KEY);
  }
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
