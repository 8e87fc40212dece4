import { expect } from 'chai';
import { HOOK_NAMES, HookRequestError, isHookName, parseHookRequest } from '../../hooks/index.ts';
import type { HookName } from '../../hooks/index.ts';
import { loadExample, requestAround } from './fixtures.ts';
import type { Json } from './fixtures.ts';

const UUID = '3f0a1c2e-5b7d-4e8f-9a1b-2c3d4e5f6a7b';

function orderSelect(): Json {
  return requestAround('hooks/order-select-context-r4.json', 'order-select');
}
function orderSign(): Json {
  return requestAround('hooks/order-sign-context-r4.json', 'order-sign');
}
function patientView(): Json {
  return loadExample('2.0/patient-view-request.json');
}

function fieldOf(fn: () => unknown): string {
  try {
    fn();
  } catch (error) {
    expect(error).to.be.instanceOf(HookRequestError);
    return (error as HookRequestError).field;
  }
  expect.fail('expected a HookRequestError');
}

describe('hooks: hook names', () => {
  it('lists exactly the three hooks we serve', () => {
    expect([...HOOK_NAMES]).to.deep.equal(['patient-view', 'order-select', 'order-sign']);
  });

  it('recognises hook names and nothing else', () => {
    expect(HOOK_NAMES.every(isHookName)).to.equal(true);
    for (const other of [
      'order-review',
      'medication-prescribe',
      'PATIENT-VIEW',
      '',
      42,
      null,
      undefined,
    ]) {
      expect(isHookName(other), String(other)).to.equal(false);
    }
  });
});

describe('hooks: parseHookRequest accepts valid requests', () => {
  it('keeps unknown context fields and drops unknown top-level fields', () => {
    const body = patientView();
    body['context']['com.example.flag'] = true;
    body['somethingNew'] = 1;
    const parsed = parseHookRequest(body, 'patient-view');
    expect(parsed.context['com.example.flag']).to.equal(true);
    expect(parsed).to.not.have.property('somethingNew');
  });

  it('drops prefetch keys the service does not declare, unchecked; checks the declared ones', () => {
    const body = patientView();
    body['prefetch'] = {
      patient: { resourceType: 'Patient', id: '1288992' },
      user: '123', // the 2.0 example's bare string, under a key this service never asked for
      extra: { resourceType: 'Observation', id: 'x' },
    };
    const parsed = parseHookRequest(body, 'patient-view', { prefetchKeys: ['patient', 'meds'] });
    expect(parsed.prefetch).to.deep.equal({ patient: { resourceType: 'Patient', id: '1288992' } });
    expect(
      fieldOf(() => parseHookRequest(body, 'patient-view', { prefetchKeys: ['user'] })),
    ).to.equal('prefetch.user');
    // Without the service's keys, every key is checked (as the spec's examples are).
    expect(fieldOf(() => parseHookRequest(body, 'patient-view'))).to.equal('prefetch.user');
  });

  it('accepts draftOrders without Bundle.type and with a type', () => {
    const body = orderSign();
    expect(body['context']['draftOrders']).to.not.have.property('type');
    expect(() => parseHookRequest(body, 'order-sign')).to.not.throw();
    body['context']['draftOrders']['type'] = 'collection';
    expect(() => parseHookRequest(body, 'order-sign')).to.not.throw();
  });

  it('accepts draftOrders mixing resource types and statuses', () => {
    const body = orderSign();
    const entries = body['context']['draftOrders']['entry'];
    entries.push({ resource: { resourceType: 'ServiceRequest', id: 'sr-1', status: 'active' } });
    entries.push({ resource: { resourceType: 'DeviceRequest', id: 'dr-1', status: 'on-hold' } });
    const parsed = parseHookRequest(body, 'order-sign');
    expect((parsed.context['draftOrders'] as Json)['entry']).to.have.length(4);
  });

  it('accepts a missing encounterId', () => {
    const body = orderSign();
    delete body['context']['encounterId'];
    expect(() => parseHookRequest(body, 'order-sign')).to.not.throw();
  });

  it('accepts Patient and RelatedPerson users on patient-view only', () => {
    for (const userId of ['Patient/1288992', 'RelatedPerson/rp-1', 'PractitionerRole/123']) {
      const body = patientView();
      body['context']['userId'] = userId;
      expect(() => parseHookRequest(body, 'patient-view'), userId).to.not.throw();
    }
    const sign = orderSign();
    sign['context']['userId'] = 'Patient/1288992';
    expect(fieldOf(() => parseHookRequest(sign, 'order-sign'))).to.equal('context.userId');
  });
});

describe('hooks: parseHookRequest bad requests name the field', () => {
  const table: Array<[string, HookName, () => unknown, string]> = [
    ['a body that is not an object', 'patient-view', () => [patientView()], 'body'],
    ['no hook', 'patient-view', () => ({ ...patientView(), hook: undefined }), 'hook'],
    ['a hook of another service', 'order-sign', () => patientView(), 'hook'],
    [
      'an unknown hook',
      'patient-view',
      () => ({ ...patientView(), hook: 'patient-transmogrify' }),
      'hook',
    ],
    [
      'no hookInstance',
      'patient-view',
      () => ({ ...patientView(), hookInstance: undefined }),
      'hookInstance',
    ],
    [
      'a hookInstance that is not a UUID',
      'patient-view',
      () => ({ ...patientView(), hookInstance: 'abc' }),
      'hookInstance',
    ],
    [
      'a urn:uuid hookInstance',
      'patient-view',
      () => ({ ...patientView(), hookInstance: `urn:uuid:${UUID}` }),
      'hookInstance',
    ],
    [
      'fhirAuthorization without fhirServer',
      'patient-view',
      () => ({ ...patientView(), fhirServer: undefined }),
      'fhirServer',
    ],
    [
      'a relative fhirServer',
      'patient-view',
      () => ({ ...patientView(), fhirServer: '/fhir' }),
      'fhirServer',
    ],
    [
      'a non-http fhirServer',
      'patient-view',
      () => ({ ...patientView(), fhirServer: 'file:///etc/passwd' }),
      'fhirServer',
    ],
    [
      'a fhirServer with credentials',
      'patient-view',
      () => ({ ...patientView(), fhirServer: 'https://u:p@ehr.example.org/fhir' }),
      'fhirServer',
    ],
    [
      'a fhirServer with a query',
      'patient-view',
      () => ({ ...patientView(), fhirServer: 'https://ehr.example.org/fhir?x=1' }),
      'fhirServer',
    ],
    [
      'a fhirServer that is not a string',
      'patient-view',
      () => ({ ...patientView(), fhirServer: 42 }),
      'fhirServer',
    ],
    [
      'fhirAuthorization not an object',
      'patient-view',
      () => ({ ...patientView(), fhirAuthorization: 'tok' }),
      'fhirAuthorization',
    ],
    [
      'no access_token',
      'patient-view',
      () => withAuth({ access_token: undefined }),
      'fhirAuthorization.access_token',
    ],
    [
      'token_type MAC',
      'patient-view',
      () => withAuth({ token_type: 'MAC' }),
      'fhirAuthorization.token_type',
    ],
    [
      'expires_in as a string',
      'patient-view',
      () => withAuth({ expires_in: '300' }),
      'fhirAuthorization.expires_in',
    ],
    [
      'expires_in not an integer',
      'patient-view',
      () => withAuth({ expires_in: 1.5 }),
      'fhirAuthorization.expires_in',
    ],
    ['no scope', 'patient-view', () => withAuth({ scope: undefined }), 'fhirAuthorization.scope'],
    [
      'no subject',
      'patient-view',
      () => withAuth({ subject: undefined }),
      'fhirAuthorization.subject',
    ],
    ['no context', 'patient-view', () => ({ ...patientView(), context: undefined }), 'context'],
    [
      'a context that is an array',
      'patient-view',
      () => ({ ...patientView(), context: [] }),
      'context',
    ],
    [
      'no userId',
      'patient-view',
      () => withContext(patientView(), { userId: undefined }),
      'context.userId',
    ],
    [
      'a bare userId',
      'patient-view',
      () => withContext(patientView(), { userId: 'example' }),
      'context.userId',
    ],
    [
      'a userId of type Device',
      'patient-view',
      () => withContext(patientView(), { userId: 'Device/1' }),
      'context.userId',
    ],
    [
      'a RelatedPerson user on order-sign',
      'order-sign',
      () => withContext(orderSign(), { userId: 'RelatedPerson/1' }),
      'context.userId',
    ],
    [
      'no patientId',
      'patient-view',
      () => withContext(patientView(), { patientId: undefined }),
      'context.patientId',
    ],
    [
      'a patientId with a slash',
      'patient-view',
      () => withContext(patientView(), { patientId: 'Patient/1' }),
      'context.patientId',
    ],
    [
      'a numeric patientId',
      'patient-view',
      () => withContext(patientView(), { patientId: 1288992 }),
      'context.patientId',
    ],
    [
      'an encounterId with spaces',
      'patient-view',
      () => withContext(patientView(), { encounterId: 'a b' }),
      'context.encounterId',
    ],
    [
      'no draftOrders',
      'order-sign',
      () => withContext(orderSign(), { draftOrders: undefined }),
      'context.draftOrders',
    ],
    [
      'draftOrders as an array',
      'order-sign',
      () => withContext(orderSign(), { draftOrders: [] }),
      'context.draftOrders',
    ],
    [
      'draftOrders not a Bundle',
      'order-sign',
      () => withContext(orderSign(), { draftOrders: { resourceType: 'List' } }),
      'context.draftOrders.resourceType',
    ],
    [
      'a draft order without resourceType',
      'order-sign',
      () =>
        withContext(orderSign(), {
          draftOrders: { resourceType: 'Bundle', entry: [{ resource: { id: 'x' } }] },
        }),
      'context.draftOrders.entry[0].resource.resourceType',
    ],
    [
      'no selections',
      'order-select',
      () => withContext(orderSelect(), { selections: undefined }),
      'context.selections',
    ],
    [
      'empty selections',
      'order-select',
      () => withContext(orderSelect(), { selections: [] }),
      'context.selections',
    ],
    [
      'a selection that is not Type/id',
      'order-select',
      () =>
        withContext(orderSelect(), {
          selections: ['NutritionOrder/pureeddiet-simple', 'smart-MedicationRequest-103'],
        }),
      'context.selections[1]',
    ],
    [
      'a selection not in draftOrders',
      'order-select',
      () =>
        withContext(orderSelect(), {
          selections: ['NutritionOrder/pureeddiet-simple', 'MedicationRequest/other'],
        }),
      'context.selections[1]',
    ],
    [
      'a selection naming a draft order that has no id',
      'order-select',
      () =>
        withContext(orderSelect(), {
          selections: ['MedicationRequest/undefined'],
          draftOrders: {
            resourceType: 'Bundle',
            entry: [{ resource: { resourceType: 'MedicationRequest' } }],
          },
        }),
      'context.selections[0]',
    ],
    [
      'prefetch as an array',
      'patient-view',
      () => ({ ...patientView(), prefetch: [] }),
      'prefetch',
    ],
    [
      'a prefetch value that is a string',
      'patient-view',
      () => ({ ...patientView(), prefetch: { patientToGreet: 'Patient/1' } }),
      'prefetch.patientToGreet',
    ],
    [
      'a prefetch value without resourceType',
      'patient-view',
      () => ({ ...patientView(), prefetch: { p: { id: '1' } } }),
      'prefetch.p.resourceType',
    ],
    [
      'extension as a string',
      'patient-view',
      () => ({ ...patientView(), extension: 'x' }),
      'extension',
    ],
    [
      'a __proto__ key at the root',
      'patient-view',
      () =>
        JSON.parse(
          `{"__proto__":{"polluted":1},${JSON.stringify(patientView()).slice(1)}`,
        ) as unknown,
      '__proto__',
    ],
    [
      'a __proto__ key in context',
      'patient-view',
      () =>
        JSON.parse(
          JSON.stringify(patientView()).replace(
            '"context":{',
            '"context":{"__proto__":{"isAdmin":true},',
          ),
        ) as unknown,
      'context.__proto__',
    ],
    [
      'a constructor key in a prefetch resource',
      'patient-view',
      () =>
        JSON.parse(
          JSON.stringify(patientView()).replace(
            '"patientToGreet":{',
            '"patientToGreet":{"constructor":{"prototype":{}},',
          ),
        ) as unknown,
      'prefetch.patientToGreet.constructor',
    ],
    [
      'a prototype key deep in draftOrders',
      'order-sign',
      () => {
        const b = orderSign();
        b['context']['draftOrders']['entry'][1]['resource']['prototype'] = {};
        return b;
      },
      'context.draftOrders.entry[1].resource.prototype',
    ],
  ];

  for (const [name, hook, make, field] of table) {
    it(`rejects ${name} (${field})`, () => {
      expect(fieldOf(() => parseHookRequest(make(), hook))).to.equal(field);
    });
  }

  it('refuses nesting deeper than 64 levels, naming the first level too deep', () => {
    const nest = (levels: number): unknown => {
      let v: unknown = 'leaf';
      for (let i = 0; i < levels; i += 1) {
        v = { a: v };
      }
      return v;
    };
    const tooDeep = { ...patientView(), extension: { x: nest(70) } };
    expect(() => parseHookRequest(tooDeep, 'patient-view'))
      .to.throw(HookRequestError)
      .with.property('message')
      .that.matches(/nesting deeper than 64 levels/);
    expect(fieldOf(() => parseHookRequest(tooDeep, 'patient-view'))).to.equal(
      `extension.x${'.a'.repeat(63)}`,
    );
    expect(() =>
      parseHookRequest({ ...patientView(), extension: { x: nest(62) } }, 'patient-view'),
    ).not.to.throw();
  });

  it('treats an unknown service hook as a bug, not a bad request', () => {
    const body = { ...patientView(), hook: 'org.example.other' };
    expect(() => parseHookRequest(body, 'org.example.other' as HookName))
      .to.throw(Error)
      .that.is.not.instanceOf(HookRequestError);
  });

  it('never echoes the access token or context values in the error', () => {
    const body = withAuth({ token_type: 'MAC' });
    body['fhirAuthorization']['access_token'] = 'SECRET-TOKEN-123';
    body['context']['patientId'] = 'PHI value';
    for (const make of [() => body, () => withContext(body, { userId: 'Device/PHI-9' })]) {
      try {
        parseHookRequest(make(), 'patient-view');
        expect.fail('should throw');
      } catch (error) {
        const text = `${(error as Error).message} ${JSON.stringify(error)}`;
        expect(text).to.not.include('SECRET-TOKEN-123');
        expect(text).to.not.include('PHI');
      }
    }
  });

  it('does not pollute Object.prototype when given __proto__ keys', () => {
    const body = JSON.parse(`{"__proto__":{"polluted":1},"hook":"patient-view"}`) as unknown;
    expect(() => parseHookRequest(body, 'patient-view')).to.throw(HookRequestError);
    expect(({} as Record<string, unknown>)['polluted']).to.equal(undefined);
  });

  it('refuses absurdly deep nesting instead of recursing', () => {
    const body = patientView();
    let deep: Json = {};
    body['context']['deep'] = deep;
    for (let i = 0; i < 200; i++) {
      const next: Json = {};
      deep['x'] = next;
      deep = next;
    }
    expect(fieldOf(() => parseHookRequest(body, 'patient-view'))).to.match(/^context\.deep(\.x)+$/);
  });
});

function withAuth(patch: Json): Json {
  const body = patientView();
  body['fhirAuthorization'] = { ...body['fhirAuthorization'], ...patch };
  return body;
}

function withContext(body: Json, patch: Json): Json {
  return { ...body, context: { ...body['context'], ...patch } };
}
