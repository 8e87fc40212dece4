import { expect } from 'chai';
import {
  normalizeFhirBaseUrl,
  parseHookRequest,
  PrefetchError,
  resolvePrefetch,
} from '../../hooks/index.ts';
import type {
  HookRequest,
  PrefetchFetchOptions,
  PrefetchResult,
  ResolvePrefetchOptions,
} from '../../hooks/index.ts';
import { searchRecord } from '../../rules/index.ts';
import { startFhirServer } from '../helpers/fhir-server.ts';
import type { TestFhirServer } from '../helpers/fhir-server.ts';
import { urlOf } from './fixtures.ts';
import type { Json } from './fixtures.ts';

const TOKEN = 'fhir-access-token-SECRET-7f3a9c';
const LIMITS: PrefetchFetchOptions = { timeoutMs: 2000, maxBytes: 1_000_000, maxPages: 10 };

const TEMPLATES = {
  patient: 'Patient/{{context.patientId}}',
  conditions: 'Condition?patient={{context.patientId}}',
  observations: 'Observation?patient={{context.patientId}}&_count=10',
};

function hookRequest(fhir: TestFhirServer, patch: Json = {}): HookRequest {
  return parseHookRequest(
    {
      hook: 'patient-view',
      hookInstance: 'd1577c69-dfbe-44ad-ba6d-3e05e953b2ea',
      fhirServer: fhir.baseUrl,
      fhirAuthorization: {
        access_token: TOKEN,
        token_type: 'Bearer',
        expires_in: 300,
        scope: 'user/Patient.read user/Observation.read user/Condition.read',
        subject: 'cellcds',
      },
      context: { userId: 'Practitioner/example', patientId: fhir.record.patientId },
      ...patch,
    },
    'patient-view',
  );
}

async function expectPrefetchError(
  promise: Promise<PrefetchResult>,
  reason: PrefetchError['reason'],
): Promise<PrefetchError> {
  try {
    await promise;
  } catch (error) {
    expect(error).to.be.instanceOf(PrefetchError);
    const e = error as PrefetchError;
    expect(e.reason, e.message).to.equal(reason);
    // The token never appears in what the server maps to a 412 or logs.
    const visible = `${e.message} ${e.stack ?? ''} ${JSON.stringify(e)} ${JSON.stringify(e.operationOutcome)}`;
    expect(visible).to.not.include(TOKEN);
    expect(e.operationOutcome['resourceType']).to.equal('OperationOutcome');
    return e;
  }
  expect.fail(`expected PrefetchError ${reason}`);
}

describe('hooks: resolvePrefetch against a local FHIR server (Synthea data)', () => {
  let fhir: TestFhirServer;
  let other: TestFhirServer;

  beforeEach(async () => {
    fhir = await startFhirServer({ token: TOKEN });
    other = await startFhirServer({ token: TOKEN });
  });
  afterEach(async () => {
    await fhir.close();
    await other.close();
  });

  function options(patch: Partial<ResolvePrefetchOptions> = {}): ResolvePrefetchOptions {
    return {
      templates: TEMPLATES,
      request: hookRequest(fhir),
      allowedFhirServers: [fhir.baseUrl],
      fetchOptions: LIMITS,
      ...patch,
    };
  }

  it('fetches missing keys with the bearer token and FHIR JSON accept header', async () => {
    const outcomes: string[] = [];
    const result = await resolvePrefetch(
      options({ observer: { onFetch: (outcome, key) => outcomes.push(`${key}:${outcome}`) } }),
    );
    const patient = result.prefetch['patient'] as Json;
    expect(patient['resourceType']).to.equal('Patient');
    expect(patient['id']).to.equal(fhir.record.patientId);
    const conditions = result.prefetch['conditions'] as Json;
    expect(conditions['type']).to.equal('searchset');
    expect(conditions['entry']).to.have.length(
      searchRecord(
        fhir.record,
        'Condition',
        new URLSearchParams(`patient=${fhir.record.patientId}`),
      ).length,
    );
    expect(result.sources).to.deep.equal({
      patient: 'fetched',
      conditions: 'fetched',
      observations: 'fetched',
    });
    expect(fhir.requests.length).to.be.greaterThan(2);
    for (const req of fhir.requests) {
      expect(req.method).to.equal('GET');
      expect(req.authorization).to.equal(`Bearer ${TOKEN}`);
      expect(req.accept).to.equal('application/fhir+json');
      expect(req.url.startsWith('/fhir/')).to.equal(true);
    }
    expect(fhir.requests.map((r) => r.url)).to.include(`/fhir/Patient/${fhir.record.patientId}`);
    expect(outcomes.sort()).to.deep.equal(['conditions:ok', 'observations:ok', 'patient:ok']);
    expect(JSON.stringify(result)).to.not.include(TOKEN);
  });

  it('percent-encodes the | of system|code tokens in the query it sends, keeping the comma OR-separator', async () => {
    const templates = {
      labs: 'Observation?patient={{context.patientId}}&code=http://loinc.org|8302-2,http://loinc.org|29463-7',
    };
    const result = await resolvePrefetch(options({ templates }));
    expect(fhir.requests.map((r) => r.url)).to.deep.equal([
      `/fhir/Observation?patient=${fhir.record.patientId}&code=http://loinc.org%7C8302-2,http://loinc.org%7C29463-7`,
    ]);
    for (const req of fhir.requests) {
      expect(req.url).to.not.include('|');
    }
    // The server decodes it back to the tokens the author wrote.
    const labs = result.prefetch['labs'] as Json;
    expect(labs['entry']).to.have.length(6);
    expect(labs['entry']).to.have.length(
      searchRecord(
        fhir.record,
        'Observation',
        new URLSearchParams(
          `patient=${fhir.record.patientId}&code=http://loinc.org|8302-2,http://loinc.org|29463-7`,
        ),
      ).length,
    );
  });

  it('does not double-encode a query the pack author already encoded', async () => {
    const templates = {
      labs: 'Observation?patient={{context.patientId}}&code=http%3A%2F%2Floinc.org%7C29463-7',
    };
    await resolvePrefetch(options({ templates }));
    expect(fhir.requests.map((r) => r.url)).to.deep.equal([
      `/fhir/Observation?patient=${fhir.record.patientId}&code=http%3A%2F%2Floinc.org%7C29463-7`,
    ]);
  });

  it('does not refetch keys the EHR sent, and keeps null as no data', async () => {
    const sentPatient = { resourceType: 'Patient', id: fhir.record.patientId, gender: 'male' };
    const request = hookRequest(fhir, {
      prefetch: {
        patient: sentPatient,
        conditions: null,
        observations: { resourceType: 'Bundle', type: 'searchset', total: 0 },
        notOurs: { resourceType: 'Basic' },
      },
    });
    const result = await resolvePrefetch(options({ request }));
    expect(result.prefetch).to.deep.equal({
      patient: sentPatient,
      conditions: null,
      observations: { resourceType: 'Bundle', type: 'searchset', total: 0 },
    });
    expect(result.sources).to.deep.equal({
      patient: 'sent',
      conditions: 'sent',
      observations: 'sent',
    });
    expect(fhir.requests).to.have.length(0);
  });

  it('fetches only the keys that are missing', async () => {
    const request = hookRequest(fhir, { prefetch: { patient: null } });
    const result = await resolvePrefetch(options({ request }));
    expect(result.sources).to.deep.equal({
      patient: 'sent',
      conditions: 'fetched',
      observations: 'fetched',
    });
    expect(fhir.requests.some((r) => r.url.startsWith('/fhir/Patient'))).to.equal(false);
  });

  it('returns empty results when there are no templates', async () => {
    expect(await resolvePrefetch(options({ templates: undefined }))).to.deep.equal({
      prefetch: {},
      sources: {},
    });
    expect(fhir.requests).to.have.length(0);
  });

  it('follows next links and merges all pages into one searchset Bundle', async () => {
    const all = searchRecord(
      fhir.record,
      'Observation',
      new URLSearchParams(`patient=${fhir.record.patientId}`),
    );
    expect(all.length).to.be.greaterThan(40);
    const result = await resolvePrefetch(
      options({
        templates: { observations: TEMPLATES.observations },
        fetchOptions: { ...LIMITS, maxPages: 100 },
      }),
    );
    const bundle = result.prefetch['observations'] as Json;
    expect(bundle['type']).to.equal('searchset');
    expect(bundle['total']).to.equal(all.length);
    expect(bundle).to.not.have.property('link');
    expect(bundle['entry'].map((e: Json) => e['resource']['id'] as unknown)).to.deep.equal(
      all.map((r) => r['id']),
    );
    expect(fhir.requests).to.have.length(Math.ceil(all.length / 10));
  });

  it('follows at most maxPages pages and keeps the remaining next link', async () => {
    const result = await resolvePrefetch(
      options({
        templates: { observations: TEMPLATES.observations },
        fetchOptions: { ...LIMITS, maxPages: 3 },
      }),
    );
    expect(fhir.requests).to.have.length(3);
    const bundle = result.prefetch['observations'] as Json;
    expect(bundle['entry']).to.have.length(30);
    expect(bundle['link']).to.have.length(1);
    expect(bundle['link'][0]['relation']).to.equal('next');
    expect(bundle['link'][0]['url']).to.include('_page=4');
  });

  it('follows the next link of a searchset the EHR sent, from fhirServer', async () => {
    const first = (await (
      await fetch(`${fhir.baseUrl}/Observation?patient=${fhir.record.patientId}&_count=20`, {
        headers: { Authorization: `Bearer ${TOKEN}` },
      })
    ).json()) as Json;
    fhir.requests.length = 0;
    const request = hookRequest(fhir, { prefetch: { observations: first } });
    const result = await resolvePrefetch(
      options({ templates: { observations: TEMPLATES.observations }, request }),
    );
    const bundle = result.prefetch['observations'] as Json;
    expect(bundle['entry']).to.have.length(first['total'] as number);
    expect(result.sources['observations']).to.equal('fetched');
    expect(fhir.requests.every((r) => r.url.includes('_count=20'))).to.equal(true);
    expect(fhir.requests).to.have.length(Math.ceil((first['total'] as number) / 20) - 1);
  });

  it('refuses a next link that leaves the fhirServer, with no request to the other host', async () => {
    fhir.behaviour.respond = (url) =>
      url.pathname === '/fhir/Observation' && !url.searchParams.has('_page')
        ? {
            status: 200,
            body: {
              resourceType: 'Bundle',
              type: 'searchset',
              link: [{ relation: 'next', url: `${other.baseUrl}/Observation?_page=2` }],
              entry: [],
            },
          }
        : undefined;
    const e = await expectPrefetchError(
      resolvePrefetch(options({ templates: { observations: TEMPLATES.observations } })),
      'not-allowed',
    );
    expect(e.key).to.equal('observations');
    expect(other.requests).to.have.length(0);
  });

  it('refuses to fetch with a token granted for another patient (fhirAuthorization.patient is not context.patientId), before any request', async () => {
    const base = hookRequest(fhir);
    const request = hookRequest(fhir, {
      fhirAuthorization: { ...base.fhirAuthorization, patient: 'someone-else' },
    });
    const e = await expectPrefetchError(resolvePrefetch(options({ request })), 'not-allowed');
    expect(e.message).to.match(/granted for another patient/);
    expect(e.message).to.not.include('someone-else');
    expect(fhir.requests).to.have.length(0);
  });

  it('fetches with a token granted for the context patient (fhirAuthorization.patient = context.patientId)', async () => {
    const base = hookRequest(fhir);
    const request = hookRequest(fhir, {
      fhirAuthorization: { ...base.fhirAuthorization, patient: fhir.record.patientId },
    });
    const result = await resolvePrefetch(options({ request }));
    expect((result.prefetch['patient'] as Json)['id']).to.equal(fhir.record.patientId);
  });

  it('refuses a sent searchset whose next link leaves the fhirServer, before any request', async () => {
    const request = hookRequest(fhir, {
      prefetch: {
        observations: {
          resourceType: 'Bundle',
          type: 'searchset',
          link: [{ relation: 'next', url: `${other.baseUrl}/Observation?_page=2` }],
        },
      },
    });
    await expectPrefetchError(resolvePrefetch(options({ request })), 'not-allowed');
    expect(fhir.requests).to.have.length(0);
    expect(other.requests).to.have.length(0);
  });

  it('refetches a key the EHR sent as an OperationOutcome', async () => {
    const failed = {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'timeout' }],
    };
    const request = hookRequest(fhir, {
      prefetch: { patient: failed, conditions: null, observations: null },
    });
    const result = await resolvePrefetch(options({ request }));
    expect((result.prefetch['patient'] as Json)['resourceType']).to.equal('Patient');
    expect(result.sources['patient']).to.equal('fetched');
    expect(fhir.requests.map((r) => r.url)).to.deep.equal([
      `/fhir/Patient/${fhir.record.patientId}`,
    ]);
  });

  it('fails with 412 data when an OperationOutcome cannot be refetched', async () => {
    const failed = {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'timeout' }],
    };
    const request = hookRequest(fhir, {
      fhirServer: undefined,
      fhirAuthorization: undefined,
      prefetch: { patient: failed },
    });
    const e = await expectPrefetchError(
      resolvePrefetch(options({ templates: { patient: TEMPLATES.patient }, request })),
      'operation-outcome',
    );
    expect(e.key).to.equal('patient');
  });

  it('fails as missing when a key is absent and there is no fhirServer or no token', async () => {
    const noServer = hookRequest(fhir, { fhirServer: undefined, fhirAuthorization: undefined });
    await expectPrefetchError(resolvePrefetch(options({ request: noServer })), 'missing');
    const noToken = hookRequest(fhir, { fhirAuthorization: undefined });
    await expectPrefetchError(resolvePrefetch(options({ request: noToken })), 'missing');
    expect(fhir.requests).to.have.length(0);
  });

  it('says the key was sent but has more pages when a sent searchset has a next link and there is no fhirServer or no token', async () => {
    const paged = {
      resourceType: 'Bundle',
      type: 'searchset',
      link: [{ relation: 'next', url: `${fhir.baseUrl}/Observation?_page=2` }],
      entry: [],
    };
    const requests = [
      hookRequest(fhir, {
        fhirServer: undefined,
        fhirAuthorization: undefined,
        prefetch: { observations: paged },
      }),
      hookRequest(fhir, { fhirAuthorization: undefined, prefetch: { observations: paged } }),
    ];
    for (const request of requests) {
      const e = await expectPrefetchError(
        resolvePrefetch(options({ templates: { observations: TEMPLATES.observations }, request })),
        'missing',
      );
      expect(e.key).to.equal('observations');
      expect(e.message).to.not.include('is not available');
      expect(e.message).to.equal(
        "prefetch 'observations' was sent, but its searchset Bundle has more pages (a next link) that cannot be fetched without fhirServer and fhirAuthorization",
      );
    }
    expect(fhir.requests).to.have.length(0);
  });

  it('still says a key absent from the prefetch is not available without fhirServer', async () => {
    const noServer = hookRequest(fhir, { fhirServer: undefined, fhirAuthorization: undefined });
    const e = await expectPrefetchError(
      resolvePrefetch(options({ templates: { patient: TEMPLATES.patient }, request: noServer })),
      'missing',
    );
    expect(e.message).to.equal("prefetch 'patient' is not available and no fhirServer was sent");
  });

  // CDS Hooks 2.0: encounterId is optional in patient-view and order-sign, and the spec's own
  // example template `PractitionerRole?_id={{userPractitionerRoleId}}` has no value for a
  // Practitioner user. Such a query does not apply to the call: no data (null), not a 412.
  it('gives null (not-applicable) for a template whose token is not in the context, without a request', async () => {
    const templates = {
      ...TEMPLATES,
      encounter: 'Encounter/{{context.encounterId}}',
      role: 'PractitionerRole?_id={{userPractitionerRoleId}}',
    };
    const result = await resolvePrefetch(options({ templates }));
    expect(result.prefetch['encounter']).to.equal(null);
    expect(result.prefetch['role']).to.equal(null);
    expect(result.sources).to.include({ encounter: 'not-applicable', role: 'not-applicable' });
    expect(result.sources['patient']).to.equal('fetched');
    expect(fhir.requests.map((r) => r.url).join(' ')).to.not.match(/Encounter|PractitionerRole/);
  });

  it('gives null (not-applicable) for such a template even with no fhirServer, or an OperationOutcome sent', async () => {
    const templates = { encounter: 'Encounter/{{context.encounterId}}' };
    const noServer = hookRequest(fhir, { fhirServer: undefined, fhirAuthorization: undefined });
    const a = await resolvePrefetch(options({ templates, request: noServer }));
    expect(a.prefetch).to.deep.equal({ encounter: null });
    const outcome = {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'not-found' }],
    };
    const withOutcome = hookRequest(fhir, { prefetch: { encounter: outcome } });
    const b = await resolvePrefetch(options({ templates, request: withOutcome }));
    expect(b.prefetch).to.deep.equal({ encounter: null });
    expect(fhir.requests).to.have.length(0);
  });

  it('keeps what the EHR sent for such a key', async () => {
    const templates = { encounter: 'Encounter/{{context.encounterId}}' };
    const encounter = { resourceType: 'Encounter', id: 'e1', status: 'finished' };
    const request = hookRequest(fhir, { prefetch: { encounter } });
    const result = await resolvePrefetch(options({ templates, request }));
    expect(result.prefetch['encounter']).to.deep.equal(encounter);
    expect(result.sources['encounter']).to.equal('sent');
  });

  it('fails as missing when a token is in the context but cannot go into a URL, before any request', async () => {
    const templates = { ...TEMPLATES, user: 'PractitionerRole?_id={{userPractitionerRoleId}}' };
    const request = hookRequest(fhir);
    // A userId that cannot be a reference (parseHookRequest would refuse it; the resolver must
    // not rely on that).
    request.context['userId'] = 'PractitionerRole/..';
    const e = await expectPrefetchError(
      resolvePrefetch(options({ templates, request })),
      'missing',
    );
    expect(e.key).to.equal('user');
    expect(fhir.requests).to.have.length(0);
  });

  const refused: Array<
    [string, (f: TestFhirServer, o: TestFhirServer) => { server: string; allowed: string[] }]
  > = [
    ['another server', (f, o) => ({ server: o.baseUrl, allowed: [f.baseUrl] })],
    ['an empty allowlist', (f) => ({ server: f.baseUrl, allowed: [] })],
    ['a sibling path', (f) => ({ server: `${f.origin}/fhir-evil`, allowed: [f.baseUrl] })],
    ['a parent path', (f) => ({ server: f.origin, allowed: [f.baseUrl] })],
    ['a child path', (f) => ({ server: `${f.baseUrl}/x`, allowed: [f.baseUrl] })],
    ['another port', (f, o) => ({ server: `${o.origin}/fhir`, allowed: [f.baseUrl] })],
    [
      'https instead of http',
      (f) => ({ server: f.baseUrl.replace('http:', 'https:'), allowed: [f.baseUrl] }),
    ],
    [
      'localhost for 127.0.0.1',
      (f) => ({ server: f.baseUrl.replace('127.0.0.1', 'localhost'), allowed: [f.baseUrl] }),
    ],
  ];
  for (const [name, make] of refused) {
    it(`refuses a fhirServer not on the allowlist (${name}) and makes no request at all`, async () => {
      const { server, allowed } = make(fhir, other);
      const outcomes: string[] = [];
      await expectPrefetchError(
        resolvePrefetch(
          options({
            request: hookRequest(fhir, { fhirServer: server }),
            allowedFhirServers: allowed,
            observer: { onFetch: (outcome) => outcomes.push(outcome) },
          }),
        ),
        'not-allowed',
      );
      expect(fhir.requests).to.have.length(0);
      expect(other.requests).to.have.length(0);
      expect(outcomes).to.deep.equal(['refused']);
    });
  }

  it('accepts an allowlisted server written differently (case, default port, trailing slash)', async () => {
    const allowed = `${fhir.baseUrl.replace('http://', 'HTTP://')}/`;
    const result = await resolvePrefetch(options({ allowedFhirServers: [allowed] }));
    expect(Object.keys(result.prefetch)).to.have.length(3);
    expect(normalizeFhirBaseUrl('https://EHR.example.org:443/fhir//')).to.equal(
      'https://ehr.example.org/fhir',
    );
    expect(normalizeFhirBaseUrl('https://u:p@ehr.example.org/fhir?x#y')).to.equal(
      'https://ehr.example.org/fhir',
    );
    expect(normalizeFhirBaseUrl('ftp://ehr.example.org/fhir')).to.equal(undefined);
    expect(normalizeFhirBaseUrl('not a url')).to.equal(undefined);
  });

  it('times out a slow server within about the timeout', async () => {
    fhir.behaviour.delayMs = 3000;
    const outcomes: string[] = [];
    const started = Date.now();
    const e = await expectPrefetchError(
      resolvePrefetch(
        options({
          fetchOptions: { ...LIMITS, timeoutMs: 200 },
          observer: { onFetch: (outcome) => outcomes.push(outcome) },
        }),
      ),
      'timeout',
    );
    const elapsed = Date.now() - started;
    expect(elapsed).to.be.within(150, 1000);
    expect(e.operationOutcome['issue']).to.deep.include({
      severity: 'error',
      code: 'timeout',
      diagnostics: e.message,
    });
    expect(outcomes).to.include('timeout');
  });

  it('runs the fetches of one call in parallel', async () => {
    // Three requests of 500 ms each: sequential would take 1.5 s.
    fhir.behaviour.delayMs = 500;
    const started = Date.now();
    await resolvePrefetch(
      options({
        templates: {
          a: 'Patient/{{context.patientId}}',
          b: 'Condition?patient={{context.patientId}}',
          c: 'Immunization?patient={{context.patientId}}',
        },
      }),
    );
    expect(Date.now() - started).to.be.below(1200);
    expect(fhir.requests).to.have.length(3);
  });

  for (const declareLength of [true, false]) {
    it(`refuses a response over maxBytes (${declareLength ? 'Content-Length' : 'chunked, counted while streaming'})`, async () => {
      fhir.behaviour.oversizeBytes = 5_000_000;
      fhir.behaviour.declareLength = declareLength;
      const started = Date.now();
      await expectPrefetchError(
        resolvePrefetch(
          options({
            templates: { patient: TEMPLATES.patient },
            fetchOptions: { ...LIMITS, maxBytes: 64 * 1024 },
          }),
        ),
        'too-large',
      );
      expect(Date.now() - started).to.be.below(1500);
    });
  }

  it('accepts a response of exactly maxBytes', async () => {
    fhir.behaviour.oversizeBytes = 10_000;
    fhir.behaviour.declareLength = false;
    const result = await resolvePrefetch(
      options({
        templates: { patient: TEMPLATES.patient },
        fetchOptions: { ...LIMITS, maxBytes: 10_000 },
      }),
    );
    expect((result.prefetch['patient'] as Json)['resourceType']).to.equal('Binary');
  });

  it('does not follow a redirect, to another server or to the same one', async () => {
    fhir.behaviour.redirectTo = `${other.baseUrl}/Patient/${fhir.record.patientId}`;
    await expectPrefetchError(
      resolvePrefetch(options({ templates: { patient: TEMPLATES.patient } })),
      'failed',
    );
    expect(fhir.requests).to.have.length(1);
    expect(other.requests).to.have.length(0);
    fhir.behaviour.redirectTo = `${fhir.baseUrl}/Patient/${fhir.record.patientId}?via=redirect`;
    await expectPrefetchError(
      resolvePrefetch(options({ templates: { patient: TEMPLATES.patient } })),
      'failed',
    );
    expect(fhir.requests).to.have.length(2);
    expect(fhir.requests.some((r) => r.url.includes('via=redirect'))).to.equal(false);
  });

  it('fails on an HTTP error, a 401 and an OperationOutcome answer', async () => {
    fhir.behaviour.failStatus = 500;
    await expectPrefetchError(resolvePrefetch(options()), 'failed');
    fhir.behaviour.failStatus = undefined;
    await expectPrefetchError(
      resolvePrefetch(options({ templates: { patient: 'Patient/does-not-exist' } })),
      'failed',
    );
    const wrongToken = hookRequest(fhir);
    wrongToken.fhirAuthorization = { ...wrongToken.fhirAuthorization!, access_token: 'wrong' };
    await expectPrefetchError(resolvePrefetch(options({ request: wrongToken })), 'failed');
    fhir.behaviour.respond = () => ({
      status: 200,
      body: { resourceType: 'OperationOutcome', issue: [] },
    });
    await expectPrefetchError(resolvePrefetch(options()), 'operation-outcome');
    fhir.behaviour.respond = () => ({ status: 200, body: [1, 2] });
    await expectPrefetchError(resolvePrefetch(options()), 'failed');
  });

  it('fails when the server cannot be reached', async () => {
    const url = fhir.baseUrl;
    await fhir.close();
    fhir = await startFhirServer({ token: TOKEN });
    const request = hookRequest(fhir, { fhirServer: url });
    await expectPrefetchError(
      resolvePrefetch(options({ request, allowedFhirServers: [url] })),
      'failed',
    );
  });

  it('uses the injected fetch and never puts the token anywhere but the header', async () => {
    const seen: Array<{ url: string; init: RequestInit | undefined }> = [];
    const fetchImpl: typeof fetch = (input, init) => {
      seen.push({ url: urlOf(input), init });
      return Promise.resolve(
        new Response(JSON.stringify({ resourceType: 'Patient', id: 'p' }), { status: 200 }),
      );
    };
    const result = await resolvePrefetch(
      options({ templates: { patient: TEMPLATES.patient }, fetchImpl }),
    );
    expect(seen).to.have.length(1);
    expect(seen[0]!.url).to.equal(`${fhir.baseUrl}/Patient/${fhir.record.patientId}`);
    expect(seen[0]!.url).to.not.include(TOKEN);
    expect(seen[0]!.init?.redirect).to.equal('manual');
    expect(seen[0]!.init?.signal).to.be.instanceOf(AbortSignal);
    expect(JSON.stringify(result)).to.not.include(TOKEN);
    expect(fhir.requests).to.have.length(0);
  });

  it('keeps a prefetch key named __proto__ as plain data', async () => {
    const request = hookRequest(fhir);
    const result = await resolvePrefetch(
      options({
        templates: JSON.parse('{"__proto__":"Patient/{{context.patientId}}"}') as Record<
          string,
          string
        >,
        request,
      }),
    );
    expect(Object.hasOwn(result.prefetch, '__proto__')).to.equal(true);
    expect(Object.getPrototypeOf(result.prefetch)).to.equal(Object.prototype);
  });
});
