// The rule-author playground: evaluates a stored pack version over a patient and shows the
// cards (as an EHR would), the rule trace and the exact JSON. The operator token is kept in
// sessionStorage (this tab only) and sent only as a bearer header.
import { callJson, pretty } from '/ui/api.mjs';
import { h, renderCards } from '/ui/cards.mjs';

const TOKEN_KEY = 'cellcds.playground.token';
const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';

/** A sensible first draft per hook: an NSAID order (the pack's interaction checks use it). */
const DEFAULT_DRAFTS = [
  {
    resourceType: 'MedicationRequest',
    status: 'draft',
    intent: 'order',
    medicationCodeableConcept: {
      coding: [{ system: RXNORM, code: '310965', display: 'Ibuprofen 200 MG Oral Tablet' }],
      text: 'Ibuprofen 200 MG Oral Tablet',
    },
    dosageInstruction: [{ text: '200 mg by mouth every 6 hours as needed' }],
  },
];

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) ?? '',
  packs: [],
  patients: [],
  services: [],
  lastService: undefined,
};

function api(url, options = {}) {
  return callJson(url, { ...options, token: state.token });
}

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle('error', isError);
}

function explain(err) {
  if (err.status === 401) {
    return 'The token was refused (unknown, revoked or malformed).';
  }
  if (err.status === 403) {
    return 'This token may not use the playground: it needs the rule-author or platform-operator role.';
  }
  return err.message;
}

function fillSelect(select, options, selected) {
  select.replaceChildren(
    ...options.map((o) => h('option', { value: o.value, selected: o.value === selected }, o.label)),
  );
}

async function loadCatalog() {
  const status = $('token-status');
  setStatus(status, 'Loading packs and patients…');
  // Stale once another token is submitted (its load then decides), as onVersionChange's
  // answer is once another pack or version is chosen.
  const token = state.token;
  try {
    const [{ packs }, { patients }] = await Promise.all([
      api('/playground/api/packs'),
      api('/playground/api/patients'),
    ]);
    if (token !== state.token) {
      return;
    }
    state.packs = packs;
    state.patients = patients;
    fillSelect(
      $('pack'),
      packs.map((p) => ({ value: p.id, label: p.id })),
    );
    fillSelect(
      $('fixture'),
      patients.map((p) => ({
        value: p.file,
        label: `${p.name}${p.gender ? `, ${p.gender === 'female' ? 'F' : p.gender === 'male' ? 'M' : p.gender}` : ''}${p.age !== undefined ? `, ${p.age}` : ''}${p.deceased ? ' (deceased)' : ''}`,
      })),
    );
    setStatus(status, `Signed in. ${packs.length} pack(s), ${patients.length} bundled patient(s).`);
    onPackChange();
    onFixtureChange();
  } catch (err) {
    if (token === state.token) {
      setStatus(status, explain(err), true);
    }
  }
}

function onPackChange() {
  const pack = state.packs.find((p) => p.id === $('pack').value);
  const versions = pack ? [...pack.versions].reverse() : [];
  fillSelect(
    $('version'),
    versions.map((v) => ({ value: v.version, label: v.version })),
  );
  void onVersionChange();
}

async function onVersionChange() {
  const id = $('pack').value;
  const version = $('version').value;
  if (!id || !version) {
    fillSelect($('service'), []);
    return;
  }
  try {
    const detail = await api(
      `/playground/api/packs/${encodeURIComponent(id)}/versions/${encodeURIComponent(version)}`,
    );
    if ($('pack').value !== id || $('version').value !== version) {
      // The user chose another pack or version while this one loaded: its answer is stale
      // (answers can arrive out of order), and the newer choice fills the list.
      return;
    }
    state.services = detail.services;
    const previous = $('service').value;
    fillSelect(
      $('service'),
      detail.services.map((s) => ({ value: s.id, label: `${s.title ?? s.id} (${s.hook})` })),
      previous,
    );
    onServiceChange();
  } catch (err) {
    setStatus($('form-status'), explain(err), true);
  }
}

function currentService() {
  return state.services.find((s) => s.id === $('service').value);
}

function onServiceChange() {
  const service = currentService();
  const drafts = $('drafts');
  const hint = $('drafts-hint');
  if (!service || service.hook === 'patient-view') {
    drafts.value = '';
    drafts.disabled = true;
    hint.textContent = 'patient-view calls carry no draft orders.';
  } else {
    drafts.disabled = false;
    if (drafts.value.trim() === '' || state.lastService?.hook === 'patient-view') {
      drafts.value = pretty(DEFAULT_DRAFTS);
    }
    hint.textContent = `${service.hook}: each resource becomes a draft order (id draft-N and the patient as subject are added when missing)${service.hook === 'order-select' ? '; all drafts are selected' : ''}.`;
  }
  state.lastService = service;
}

function onFixtureChange() {
  const patient = state.patients.find((p) => p.file === $('fixture').value);
  $('fixture-hint').textContent = patient
    ? `Last encounter ${patient.lastEncounter ?? 'unknown'}${patient.hints.length ? ` · rule hints: ${patient.hints.join(', ')}` : ''}`
    : '';
  if (patient?.lastEncounter) {
    $('asof').value = patient.lastEncounter;
  }
}

function onSourceChange() {
  const upload = $('source-upload').checked;
  $('fixture-fields').hidden = upload;
  $('upload-fields').hidden = !upload;
}

async function patientBody() {
  if ($('source-upload').checked) {
    const file = $('bundle').files[0];
    if (!file) {
      throw new Error('Choose a Bundle file to upload.');
    }
    let bundle;
    try {
      bundle = JSON.parse(await file.text());
    } catch {
      throw new Error('The file is not valid JSON.');
    }
    return { bundle };
  }
  const fixture = $('fixture').value;
  if (!fixture) {
    throw new Error('Choose a bundled patient.');
  }
  return { fixture };
}

function draftOrders() {
  const drafts = $('drafts');
  if (drafts.disabled || drafts.value.trim() === '') {
    return undefined;
  }
  let value;
  try {
    value = JSON.parse(drafts.value);
  } catch {
    throw new Error('Draft orders are not valid JSON.');
  }
  if (!Array.isArray(value)) {
    throw new Error('Draft orders must be a JSON array of FHIR resources.');
  }
  return value;
}

const STATUS_TEXT = {
  fired: 'Fired',
  'not-fired': 'Not fired',
  error: 'Error',
  timeout: 'Timeout',
  skipped: 'Skipped',
};
const STATUS_MARK = { fired: '✔', 'not-fired': '–', error: '✖', timeout: '⏱', skipped: '…' };

function renderTrace(result) {
  const rules = new Map(result.rules.map((r) => [r.id, r]));
  const rows = result.trace.map((t) => {
    const rule = rules.get(t.ruleId);
    const why = t.error
      ? h('span', { class: 'error-text' }, t.error)
      : rule
        ? h(
            'details',
            {},
            h('summary', {}, t.fired ? 'Condition was true' : 'Condition was not true'),
            h('code', { class: 'expr' }, rule.when),
            t.firstFalse
              ? h(
                  'div',
                  { class: 'first-false' },
                  `First part to come out ${t.firstFalse.result} (${t.firstFalse.operand} of ${t.firstFalse.of}):`,
                  h('code', { class: 'expr' }, t.firstFalse.expression),
                )
              : null,
          )
        : '';
    return h(
      'tr',
      { class: `trace-${t.status}`, 'data-rule': t.ruleId },
      h(
        'th',
        { scope: 'row' },
        h('code', {}, t.ruleId),
        rule?.title ? h('div', { class: 'muted small' }, rule.title) : null,
      ),
      h(
        'td',
        {},
        h(
          'span',
          { class: `trace-status trace-status-${t.status}` },
          h('span', { 'aria-hidden': 'true' }, STATUS_MARK[t.status] ?? ''),
          ' ',
          STATUS_TEXT[t.status] ?? t.status,
        ),
      ),
      h('td', { class: 'num' }, t.durationMs.toFixed(1)),
      h('td', {}, why),
    );
  });
  $('trace').tBodies[0].replaceChildren(...rows);
  renderLets(result.lets ?? []);
}

/** Each let the call computed: its status, time and a summary of its value (count, first items). */
function renderLets(lets) {
  const rows = lets.map((l) =>
    h(
      'tr',
      { class: `trace-${l.status === 'ok' ? 'fired' : 'error'}`, 'data-let': l.name },
      h('th', { scope: 'row' }, h('code', {}, `%${l.name}`)),
      h('td', { class: 'num' }, l.durationMs.toFixed(1)),
      h(
        'td',
        {},
        l.status === 'ok'
          ? h('code', { class: 'let-value' }, l.value ?? '')
          : h('span', { class: 'error-text' }, `${l.status}${l.error ? `: ${l.error}` : ''}`),
      ),
    ),
  );
  $('lets').tBodies[0].replaceChildren(...rows);
}

async function sendFeedback(card, item) {
  const service = state.lastResult?.service.id;
  const result = await api('/playground/api/feedback', {
    method: 'POST',
    body: { service, feedback: [item] },
  });
  state.feedback.push(result);
  $('feedback-json').textContent = pretty(state.feedback);
  $('feedback-details').open = true;
}

async function evaluate(event) {
  event.preventDefault();
  const status = $('form-status');
  const button = $('evaluate');
  let body;
  try {
    const asof = $('asof').value;
    body = {
      pack: $('pack').value,
      version: $('version').value,
      service: $('service').value,
      patient: await patientBody(),
      ...(draftOrders() ? { draftOrders: draftOrders() } : {}),
      // The date alone: the server reads it as 00:00 UTC, as a pack test's date-only `now`.
      ...(asof ? { now: asof } : {}),
    };
  } catch (err) {
    setStatus(status, err.message, true);
    return;
  }
  button.disabled = true;
  setStatus(status, 'Evaluating…');
  try {
    const result = await api('/playground/api/evaluate', { method: 'POST', body });
    state.lastResult = result;
    state.feedback = [];
    const cards = result.response.cards;
    const fired = result.trace.filter((t) => t.fired).length;
    $('summary').textContent =
      `${cards.length} card${cards.length === 1 ? '' : 's'} · ${fired} of ${result.trace.length} rules fired · ${result.pack.id}@${result.pack.version} · ${result.service.id} (${result.service.hook}) · ${Math.round(result.durationMs)} ms · as of ${result.now}`;
    renderCards($('cards'), cards, {
      idPrefix: 'pg',
      sendFeedback,
      emptyText: 'No cards: no rule fired for this patient.',
    });
    renderTrace(result);
    $('request-json').textContent = pretty(result.request);
    $('response-json').textContent = pretty(result.response);
    $('feedback-json').textContent = '';
    setStatus(status, `Done: ${cards.length} card(s).`);
    $('results').focus();
  } catch (err) {
    setStatus(status, explain(err), true);
  } finally {
    button.disabled = false;
  }
}

function init() {
  state.feedback = [];
  $('token').value = state.token;
  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    state.token = $('token').value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    void loadCatalog();
  });
  $('pack').addEventListener('change', onPackChange);
  $('version').addEventListener('change', () => void onVersionChange());
  $('service').addEventListener('change', onServiceChange);
  $('fixture').addEventListener('change', onFixtureChange);
  $('source-fixture').addEventListener('change', onSourceChange);
  $('source-upload').addEventListener('change', onSourceChange);
  $('eval-form').addEventListener('submit', (event) => void evaluate(event));
  if (state.token) {
    void loadCatalog();
  }
}

init();
