// The SMART card viewer, after the EHR launch: fhirclient completes the code exchange (PKCE),
// then the page asks cellcds for the tenant's patient-view cards. Each call carries the
// EHR-signed id_token as its bearer credential; the access token travels in the body so that
// cellcds can read the patient's data from the (allowlisted) FHIR server. See docs/smart-app.md.
import { callJson } from '/ui/api.mjs';
import { h, renderCards } from '/ui/cards.mjs';

const LAUNCH_KEY = 'cellcds.app.launch';
const status = document.getElementById('app-status');

function setStatus(text, isError = false) {
  status.textContent = text;
  status.classList.toggle('error', isError);
}

function humanName(patient) {
  const name = Array.isArray(patient.name)
    ? (patient.name.find((n) => n.use === 'official') ?? patient.name[0])
    : undefined;
  if (!name) {
    return 'Unnamed patient';
  }
  if (typeof name.text === 'string' && name.text !== '') {
    return name.text;
  }
  return [...(name.given ?? []), name.family ?? ''].join(' ').trim() || 'Unnamed patient';
}

async function showPatient(client) {
  try {
    const patient = await client.patient.read();
    const banner = document.getElementById('patient-banner');
    banner.replaceChildren(
      h('span', { class: 'visually-hidden' }, 'Patient: '),
      h('strong', {}, humanName(patient)),
      patient.birthDate ? ` · born ${patient.birthDate}` : '',
      patient.gender ? ` · ${patient.gender}` : '',
    );
  } catch {
    // The banner is a convenience; the cards do not depend on it.
  }
}

/** The launch this tab started (launch.mjs), or null. */
function launchBinding() {
  try {
    const value = JSON.parse(sessionStorage.getItem(LAUNCH_KEY) ?? 'null');
    return value && typeof value.clientId === 'string' && typeof value.iss === 'string'
      ? value
      : null;
  } catch {
    return null;
  }
}

const trimSlash = (url) => String(url ?? '').replace(/\/+$/, '');

function explain(err) {
  if (err.status === 401) {
    return 'cellcds refused this launch: your EHR sign-in could not be verified for a registered organisation. Relaunch the app from the EHR; if it persists, contact your administrator.';
  }
  return `Cards could not be loaded: ${err.message}`;
}

async function main() {
  let client;
  try {
    client = await window.FHIR.oauth2.ready();
  } catch (err) {
    setStatus(`Open this app from your EHR (${err.message})`, true);
    return;
  }
  // The callback must complete the launch this tab started: the same FHIR server and the
  // client id cellcds chose for its tenant. cellcds checks the id_token's aud against that
  // tenant's client id anyway; this stops a swapped session before any call.
  const binding = launchBinding();
  if (
    !binding ||
    binding.clientId !== client.state.clientId ||
    trimSlash(binding.iss) !== trimSlash(client.state.serverUrl)
  ) {
    setStatus(
      'This sign-in does not match the launch started in this tab. Relaunch the app from your EHR.',
      true,
    );
    return;
  }
  const token = client.state.tokenResponse ?? {};
  if (typeof token.id_token !== 'string' || token.id_token === '') {
    setStatus(
      'Your EHR did not provide an OpenID id_token (scopes openid fhirUser), so cellcds cannot verify who you are. No cards were requested.',
      true,
    );
    return;
  }
  const patientId = client.patient.id;
  if (!patientId) {
    setStatus('The launch has no patient in context. Open the app from a patient chart.', true);
    return;
  }
  void showPatient(client);
  const tenant = binding.tenant ?? undefined;
  const fhirServer = client.state.serverUrl;
  const encounterId = client.encounter.id ?? undefined;
  const common = { fhirServer, ...(tenant ? { tenant } : {}) };

  setStatus('Asking cellcds for decision support…');
  let result;
  try {
    result = await callJson('/app/api/patient-view', {
      method: 'POST',
      token: token.id_token,
      body: {
        ...common,
        fhirAuthorization: {
          access_token: token.access_token,
          token_type: 'Bearer',
          ...(Number.isInteger(token.expires_in) ? { expires_in: token.expires_in } : {}),
          ...(token.scope ? { scope: token.scope } : {}),
          ...(token.patient ? { patient: String(token.patient) } : {}),
        },
        context: { patientId, ...(encounterId ? { encounterId } : {}) },
      },
    });
  } catch (err) {
    setStatus(explain(err), true);
    return;
  }

  const container = document.getElementById('services');
  container.replaceChildren();
  let total = 0;
  for (const service of result.services) {
    const cards = h('div', { class: 'service-cards' });
    const headingId = `svc-${service.id}`;
    const section = h(
      'section',
      { class: 'service', 'aria-labelledby': headingId },
      h('h2', { id: headingId }, service.title ?? service.id),
    );
    if (service.error) {
      section.append(
        h('p', { class: 'status error' }, `This service could not run: ${service.error.message}`),
      );
    }
    section.append(cards);
    container.append(section);
    total += service.cards.length;
    renderCards(cards, service.cards, {
      idPrefix: headingId,
      emptyText: 'Nothing to review from this service.',
      sendFeedback: (_card, item) =>
        callJson('/app/api/feedback', {
          method: 'POST',
          token: token.id_token,
          body: { ...common, service: service.id, feedback: [item] },
        }),
    });
  }
  if (result.services.length === 0) {
    setStatus('No patient-view decision support is configured for your organisation.');
  } else {
    setStatus(`${total} card${total === 1 ? '' : 's'} for this patient.`);
  }
}

void main();
