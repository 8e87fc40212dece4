/**
 * Conformance over the official CDS Hooks 2.0 / hook library examples copied in
 * spec/fixtures/cds-hooks-spec/ (see its README), checked against shared CDS-HOOKS.md §3–§7, §11.
 */
import { expect } from 'chai';
import {
  discoveryEntry,
  finalizeCards,
  HookRequestError,
  operationOutcome,
  parseHookRequest,
  PrefetchError,
  resolvePrefetch,
} from '../../hooks/index.ts';
import type { Card, HookName, PrefetchFetchOptions } from '../../hooks/index.ts';
import type { PackService, RawCard } from '../../rules/index.ts';
import { startFhirServer } from '../helpers/fhir-server.ts';
import type { TestFhirServer } from '../helpers/fhir-server.ts';
import { loadExample, requestAround, urlOf } from './fixtures.ts';
import type { Json } from './fixtures.ts';

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const LIMITS: PrefetchFetchOptions = { timeoutMs: 2000, maxBytes: 1_000_000, maxPages: 5 };

/** Every path in `value` whose value is null, "", [] or {} (CDS Hooks 2.0 "Use of JSON"). */
function emptyPaths(value: unknown, path = '$'): string[] {
  if (value === null || value === '') {
    return [path];
  }
  if (Array.isArray(value)) {
    return value.length === 0 ? [path] : value.flatMap((v, i) => emptyPaths(v, `${path}[${i}]`));
  }
  if (typeof value === 'object') {
    const entries = Object.entries(value);
    return entries.length === 0
      ? [path]
      : entries.flatMap(([k, v]) => emptyPaths(v, `${path}.${k}`));
  }
  return [];
}

function isAbsoluteUrl(value: unknown): boolean {
  return typeof value === 'string' && /^https?:\/\/[^/]/.test(value);
}

/** The CDS-HOOKS.md §6/§11 card checklist, field by field. */
function checkCard(card: Card): void {
  expect(card.uuid).to.match(UUID_RE);
  expect(card.summary).to.be.a('string').that.is.not.empty;
  expect(card.summary.length).to.be.below(140);
  expect(['info', 'warning', 'critical']).to.include(card.indicator);
  expect(card.source.label).to.be.a('string').that.is.not.empty;
  for (const field of ['url', 'icon'] as const) {
    if (card.source[field] !== undefined) {
      expect(isAbsoluteUrl(card.source[field]), `source.${field}`).to.equal(true);
    }
  }
  if (card.detail !== undefined) {
    expect(card.detail).to.be.a('string');
  }
  if (card.suggestions !== undefined) {
    expect(['at-most-one', 'any']).to.include(card.selectionBehavior);
    for (const s of card.suggestions) {
      expect(s.label).to.be.a('string').that.is.not.empty;
      expect(s.uuid).to.match(UUID_RE);
      for (const a of s.actions ?? []) {
        expect(['create', 'update', 'delete']).to.include(a.type);
        expect(a.description).to.be.a('string').that.is.not.empty;
        if (a.type === 'delete') {
          expect(a.resourceId).to.match(/^[A-Z][A-Za-z]+\/.+$/);
        } else {
          expect(a.resource?.['resourceType']).to.be.a('string');
        }
      }
    }
    if (card.selectionBehavior === 'at-most-one') {
      expect(card.suggestions.filter((s) => s.isRecommended === true).length).to.be.at.most(1);
    }
  } else {
    expect(card).to.not.have.property('selectionBehavior');
  }
  for (const reason of card.overrideReasons ?? []) {
    expect(reason.code).to.be.a('string').that.is.not.empty;
    expect(reason.system).to.be.a('string').that.is.not.empty;
    expect(reason.display).to.be.a('string').that.is.not.empty;
  }
  for (const link of card.links ?? []) {
    expect(link.label).to.be.a('string').that.is.not.empty;
    expect(isAbsoluteUrl(link.url)).to.equal(true);
    expect(['absolute', 'smart']).to.include(link.type);
    if (link.type !== 'smart') {
      expect(link).to.not.have.property('appContext');
    }
  }
  expect(card).to.not.have.property('ruleId');
  expect(emptyPaths(card)).to.deep.equal([]);
}

describe('hooks conformance: official request examples', () => {
  const contexts: Array<[string, HookName]> = [
    ['hooks/patient-view-context-1.json', 'patient-view'],
    ['hooks/patient-view-context-2.json', 'patient-view'],
    ['hooks/order-sign-context-r4.json', 'order-sign'],
    ['hooks/order-select-context-r4.json', 'order-select'],
    // Not R4, but structurally the same context: draftOrders is a Bundle of request resources.
    ['hooks/order-sign-context-stu3.json', 'order-sign'],
    ['hooks/order-sign-context-dstu2.json', 'order-sign'],
  ];
  for (const [file, hook] of contexts) {
    it(`parses the ${hook} context example ${file}`, () => {
      const body = requestAround(file, hook);
      const parsed = parseHookRequest(body, hook);
      expect(parsed.hook).to.equal(hook);
      expect(parsed.context).to.deep.equal(body['context']);
    });
  }

  it('parses 2.0/patient-view-request.json with fhirAuthorization and prefetch intact', () => {
    const body = loadExample('2.0/patient-view-request.json');
    const parsed = parseHookRequest(body, 'patient-view');
    expect(parsed).to.deep.equal(body);
  });

  it('accepts the request extension of 2.0/request-with-extension.json', () => {
    const body = loadExample('2.0/request-with-extension.json');
    // The spec snippet shows only the extension mechanics: its context omits patientId, which
    // the patient-view hook (library STU1) makes REQUIRED, so as sent it is refused for that
    // field and nothing else.
    expect(() => parseHookRequest(body, 'patient-view'))
      .to.throw(HookRequestError)
      .with.property('field', 'context.patientId');
    body['context']['patientId'] = '1288992';
    const parsed = parseHookRequest(body, 'patient-view');
    expect(parsed.extension).to.deep.equal(body['extension']);
    expect(parsed.fhirServer).to.equal('http://fhir.example.org:9080');
  });

  it('parses the 3.0-ballot paginated order-sign request (Bundle.type collection)', () => {
    const body = loadExample('3.0-ballot/order-sign-request-paginated-prefetch.json');
    const parsed = parseHookRequest(body, 'order-sign');
    expect(parsed.prefetch?.['orders']).to.deep.equal(body['prefetch']['orders']);
  });
});

describe('hooks conformance: official prefetch examples', () => {
  let fhir: TestFhirServer;
  beforeEach(async () => {
    fhir = await startFhirServer();
  });
  afterEach(async () => {
    await fhir.close();
  });

  const templates = loadExample('2.0/prefetch-templates.json')['prefetch'] as Record<
    string,
    string
  >;

  function exampleRequest(prefetch: Json, withServer: boolean): Json {
    return {
      hook: 'patient-view',
      hookInstance: 'd1577c69-dfbe-44ad-ba6d-3e05e953b2ea',
      ...(withServer
        ? {
            fhirServer: fhir.baseUrl,
            fhirAuthorization: {
              access_token: fhir.token,
              token_type: 'Bearer',
              expires_in: 300,
              scope: 'user/Condition.read',
              subject: 'cellcds',
            },
          }
        : {}),
      context: { userId: 'PractitionerRole/123', patientId: fhir.record.patientId },
      prefetch,
    };
  }

  it("refuses the 2.0 example's bare-string `user` value (fixed to a Bundle in 3.0)", () => {
    const data = loadExample('2.0/prefetch-data.json')['prefetch'] as Json;
    expect(data['user']).to.equal('123');
    expect(() => parseHookRequest(exampleRequest(data, true), 'patient-view'))
      .to.throw(HookRequestError)
      .with.property('field', 'prefetch.user');
  });

  it('uses the sent keys and fetches the missing diabetes-type2 key', async () => {
    const data = loadExample('3.0-ballot/prefetch-data-user-as-bundle.json')['prefetch'] as Json;
    expect(data).to.not.have.property('diabetes-type2');
    const request = parseHookRequest(exampleRequest(data, true), 'patient-view');
    const result = await resolvePrefetch({
      templates,
      request,
      allowedFhirServers: [fhir.baseUrl],
      fetchOptions: LIMITS,
    });
    expect(result.sources).to.deep.equal({
      patient: 'sent',
      'hemoglobin-a1c': 'sent',
      'diabetes-type2': 'fetched',
      user: 'sent',
    });
    expect(result.prefetch['patient']).to.deep.equal(data['patient']);
    expect(result.prefetch['hemoglobin-a1c']).to.deep.equal(data['hemoglobin-a1c']);
    expect(result.prefetch['user']).to.deep.equal(data['user']);
    expect((result.prefetch['diabetes-type2'] as Json)['type']).to.equal('searchset');
    expect(fhir.requests.map((r) => r.url)).to.deep.equal([
      `/fhir/Condition?patient=${fhir.record.patientId}&code=44054006&category=problem-list-item&status=active`,
    ]);
  });

  it('keeps a null value as "no data" without fetching', async () => {
    const data = {
      ...loadExample('3.0-ballot/prefetch-data-user-as-bundle.json')['prefetch'],
      'diabetes-type2': null,
    };
    const request = parseHookRequest(exampleRequest(data, false), 'patient-view');
    const result = await resolvePrefetch({
      templates,
      request,
      allowedFhirServers: [fhir.baseUrl],
      fetchOptions: LIMITS,
    });
    expect(result.prefetch['diabetes-type2']).to.equal(null);
    expect(fhir.requests).to.have.length(0);
  });

  it('fails the missing key with 412 data when there is no fhirServer', async () => {
    const data = loadExample('3.0-ballot/prefetch-data-user-as-bundle.json')['prefetch'] as Json;
    const request = parseHookRequest(exampleRequest(data, false), 'patient-view');
    try {
      await resolvePrefetch({
        templates,
        request,
        allowedFhirServers: [fhir.baseUrl],
        fetchOptions: LIMITS,
      });
      expect.fail('should fail');
    } catch (error) {
      expect(error).to.be.instanceOf(PrefetchError);
      expect((error as PrefetchError).key).to.equal('diabetes-type2');
      expect((error as PrefetchError).reason).to.equal('missing');
    }
  });

  it('follows the next link of the 3.0-ballot paginated example with the bearer token', async () => {
    const body = loadExample('3.0-ballot/order-sign-request-paginated-prefetch.json');
    body['fhirAuthorization'] = {
      access_token: 'example-token',
      token_type: 'Bearer',
      expires_in: 300,
      scope: 'user/MedicationRequest.read',
      subject: 'cellcds',
    };
    const request = parseHookRequest(body, 'order-sign');
    const calls: Array<{ url: string; auth: string | null }> = [];
    const page2 = {
      resourceType: 'Bundle',
      type: 'searchset',
      total: 2,
      entry: [
        { resource: { resourceType: 'MedicationRequest', id: 'rx-page-2-01', status: 'active' } },
      ],
    };
    const result = await resolvePrefetch({
      templates: { orders: 'MedicationRequest?patient={{context.patientId}}&_count=1' },
      request,
      allowedFhirServers: ['https://ehr.example.org/fhir'],
      fetchOptions: LIMITS,
      fetchImpl: (input, init) => {
        calls.push({ url: urlOf(input), auth: new Headers(init?.headers).get('authorization') });
        return Promise.resolve(new Response(JSON.stringify(page2), { status: 200 }));
      },
    });
    expect(calls).to.deep.equal([
      {
        url: 'https://ehr.example.org/fhir/MedicationRequest?patient=1288992&_count=1&_page=2',
        auth: 'Bearer example-token',
      },
    ]);
    const merged = result.prefetch['orders'] as Json;
    expect(merged['total']).to.equal(2);
    expect(merged['entry'].map((e: Json) => e['resource']['id'] as unknown)).to.deep.equal([
      body['prefetch']['orders']['entry'][0]['resource']['id'],
      'rx-page-2-01',
    ]);
  });
});

describe('hooks conformance: our cards against the 2.0 checklist', () => {
  function rawFromExample(card: Json, ruleId: string): RawCard {
    const { uuid: _uuid, ...rest } = card;
    return { ruleId, ...rest } as RawCard;
  }

  it('finalizes the cards of 2.0/response-cards.json field by field', () => {
    const example = loadExample('2.0/response-cards.json')['cards'] as Json[];
    const cards = finalizeCards(example.map((c, i) => rawFromExample(c, `rule-${i}`)));
    expect(cards).to.have.length(2);
    cards.forEach((card) => {
      checkCard(card);
    });
    expect(cards[0]!.uuid).to.not.equal(example[0]!['uuid']);
    const [first, second] = cards;
    expect(first!.links).to.deep.equal(example[0]!['links']);
    expect(first!.links?.[2]?.appContext).to.be.a('string');
    expect(first!.source).to.deep.equal(example[0]!['source']);
    expect(first!.detail).to.equal('This is an example card.');
    expect(second!.overrideReasons).to.deep.equal(example[1]!['overrideReasons']);
  });

  it('gives cards with suggestions a selectionBehavior and every suggestion a uuid', () => {
    const raw: RawCard = {
      ruleId: 'order-check',
      summary: 'Consider an alternative order',
      indicator: 'warning',
      source: loadExample('2.0/card-source.json')['source'],
      overrideReasons: loadExample('2.0/card-overrideReasons.json')['overrideReasons'],
      suggestions: [
        {
          label: 'Replace the order',
          isRecommended: true,
          actions: [
            loadExample('2.0/action-delete.json') as never,
            loadExample('2.0/action-create.json') as never,
          ],
        },
        { label: 'Update the order', actions: [loadExample('2.0/action-update.json') as never] },
      ],
    };
    const [card] = finalizeCards([raw]);
    checkCard(card!);
    expect(card!.selectionBehavior).to.equal('at-most-one');
    expect(card!.source.topic).to.deep.equal(raw.source.topic);
    const ids = [card!.uuid, ...card!.suggestions!.map((s) => s.uuid)];
    expect(new Set(ids).size).to.equal(3);
    expect(card!.suggestions![0]!.actions![1]!.resource).to.deep.equal(
      loadExample('2.0/action-create.json')['resource'],
    );
  });
});

describe('hooks conformance: discovery and 412 bodies', () => {
  it('reproduces the services of 2.0/discovery-response.json exactly', () => {
    const example = loadExample('2.0/discovery-response.json')['services'] as Json[];
    for (const service of example) {
      expect(discoveryEntry(service as PackService)).to.deep.equal(service);
    }
  });

  it('leaves out empty optional fields and anything not in a discovery entry', () => {
    const service = {
      id: 'x',
      hook: 'order-sign',
      title: '',
      description: 'A service',
      prefetch: {},
      usageRequirements: undefined,
      rules: ['internal'],
    } as unknown as PackService;
    const entry = discoveryEntry(service);
    expect(entry).to.deep.equal({ hook: 'order-sign', description: 'A service', id: 'x' });
    expect(emptyPaths(entry)).to.deep.equal([]);
  });

  it('builds an OperationOutcome shaped like the 3.0-ballot 412 example', () => {
    const example = loadExample('3.0-ballot/error-412-operationoutcome.json');
    const ours = operationOutcome('prefetch key could not be obtained');
    expect(ours['resourceType']).to.equal(example['resourceType']);
    const [issue] = ours['issue'] as Json[];
    expect(issue).to.deep.equal({
      severity: 'error',
      code: 'processing',
      diagnostics: 'prefetch key could not be obtained',
    });
    expect(example['issue'][0]).to.include({ severity: 'error', code: 'processing' });
    expect(operationOutcome('slow', 'timeout')['issue']).to.deep.equal([
      { severity: 'error', code: 'timeout', diagnostics: 'slow' },
    ]);
  });
});
