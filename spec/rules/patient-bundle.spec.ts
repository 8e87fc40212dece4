import { expect } from 'chai';
import path from 'node:path';
import {
  buildRequestFromRecord,
  PackValidationError,
  readPatientBundle,
  searchRecord,
} from '../../rules/index.ts';
import type { PackService, PatientRecord } from '../../rules/index.ts';
import {
  readJson,
  SYNTHEA_DIR,
  syntheaBundle,
  syntheaManifest,
  syntheaPatient,
} from './content-fixtures.ts';

type Json = Record<string, unknown>;

const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';

function collectReferences(node: unknown, out: string[] = []): string[] {
  if (Array.isArray(node)) {
    for (const item of node) {
      collectReferences(item, out);
    }
  } else if (typeof node === 'object' && node !== null) {
    for (const [key, value] of Object.entries(node)) {
      if (key === 'reference' && typeof value === 'string') {
        out.push(value);
      } else {
        collectReferences(value, out);
      }
    }
  }
  return out;
}

function params(query: string): URLSearchParams {
  return new URLSearchParams(query);
}

function tiny(): Json {
  return {
    resourceType: 'Bundle',
    type: 'collection',
    entry: [
      { fullUrl: 'urn:uuid:p1', resource: { resourceType: 'Patient', id: 'p1' } },
      {
        fullUrl: 'urn:uuid:c1',
        resource: {
          resourceType: 'Condition',
          id: 'c1',
          clinicalStatus: { coding: [{ code: 'active' }] },
          code: { coding: [{ system: 'http://snomed.info/sct', code: '44054006' }] },
          subject: { reference: 'urn:uuid:p1' },
        },
      },
      {
        fullUrl: 'http://ehr.example.org/fhir/MedicationRequest/m1',
        resource: {
          resourceType: 'MedicationRequest',
          id: 'm1',
          status: 'active',
          medicationCodeableConcept: { coding: [{ system: RXNORM, code: '855332' }] },
          subject: { reference: 'urn:uuid:p1' },
          reasonReference: [{ reference: 'urn:uuid:c1' }],
        },
      },
      {
        fullUrl: 'urn:uuid:m2',
        resource: {
          resourceType: 'MedicationRequest',
          status: 'stopped',
          medicationCodeableConcept: { coding: [{ system: RXNORM, code: '849574' }] },
          subject: { reference: 'urn:uuid:p1' },
          basedOn: [{ reference: 'http://ehr.example.org/fhir/MedicationRequest/m1' }],
          note: [{ text: 'see urn:uuid:c1' }],
          supportingInformation: [{ reference: 'urn:uuid:not-in-bundle' }],
        },
      },
    ],
  };
}

describe('rules/patient-bundle', () => {
  describe('readPatientBundle', () => {
    it('reads every Synthea fixture: one patient, no urn:uuid reference left, all resolvable', () => {
      const manifest = syntheaManifest();
      expect(manifest).to.have.length(53);
      for (const entry of manifest) {
        const bundle = readJson(path.join(SYNTHEA_DIR, entry.file)) as { entry: unknown[] };
        const record = readPatientBundle(bundle);
        expect(record.patientId, entry.file).to.equal(entry.patient_id);
        expect(record.resources).to.have.length(bundle.entry.length);
        const known = new Set(
          record.resources.map((r) => `${String(r.resourceType)}/${String(r.id)}`),
        );
        const refs = collectReferences(record.resources);
        expect(
          refs.filter((r) => r.startsWith('urn:uuid:')),
          entry.file,
        ).to.deep.equal([]);
        // Synthea's `#referral/...` and `#coverage/...` are local (contained-style) references.
        const external = refs.filter((r) => !r.startsWith('#'));
        expect(
          external.filter((r) => !known.has(r)),
          entry.file,
        ).to.deep.equal([]);
      }
    });

    it('rewrites urn:uuid and absolute fullUrls to Type/id and leaves the rest', () => {
      const record = readPatientBundle(tiny());
      const [, condition, m1, m2] = record.resources;
      expect(condition!.subject).to.deep.equal({ reference: 'Patient/p1' });
      expect(m1!.reasonReference).to.deep.equal([{ reference: 'Condition/c1' }]);
      expect(m2!.basedOn).to.deep.equal([{ reference: 'MedicationRequest/m1' }]);
      expect(m2!.note).to.deep.equal([{ text: 'see urn:uuid:c1' }]);
      expect(m2!.supportingInformation).to.deep.equal([{ reference: 'urn:uuid:not-in-bundle' }]);
    });

    it('gives an id from a urn:uuid fullUrl to a resource without one', () => {
      const record = readPatientBundle(tiny());
      expect(record.resources[3]!.id).to.equal('m2');
    });

    it('does not modify its input', () => {
      const bundle = syntheaBundle('Derek_Becker');
      const before = JSON.stringify(bundle);
      readPatientBundle(bundle);
      expect(JSON.stringify(bundle)).to.equal(before);
    });

    const bad: Array<[string, unknown, RegExp]> = [
      ['null', null, /not a FHIR Bundle/],
      ['an array', [], /not a FHIR Bundle/],
      ['a Patient', { resourceType: 'Patient', id: 'p' }, /not a FHIR Bundle/],
      ['a Bundle with no Patient', { resourceType: 'Bundle', entry: [] }, /found 0/],
      [
        'a Bundle with two Patients',
        {
          resourceType: 'Bundle',
          entry: [
            { resource: { resourceType: 'Patient', id: 'a' } },
            { resource: { resourceType: 'Patient', id: 'b' } },
          ],
        },
        /found 2/,
      ],
      ['a non-array entry', { resourceType: 'Bundle', entry: {} }, /not an array/],
      ['an entry without a resource', { resourceType: 'Bundle', entry: [{}] }, /entry\[0\]/],
      [
        'an unknown resource type',
        { resourceType: 'Bundle', entry: [{ resource: { resourceType: 'Nonsense', id: 'x' } }] },
        /resourceType/,
      ],
      [
        'a resource without an id or urn:uuid fullUrl',
        {
          resourceType: 'Bundle',
          entry: [{ fullUrl: 'http://x/Patient', resource: { resourceType: 'Patient' } }],
        },
        /has no id/,
      ],
    ];
    for (const [name, value, message] of bad) {
      it(`rejects ${name}`, () => {
        expect(() => readPatientBundle(value)).to.throw(Error, message);
      });
    }

    it('keeps a __proto__ key as data and pollutes nothing', () => {
      const text =
        '{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","id":"p",' +
        '"__proto__":{"polluted":true}}}]}';
      const record = readPatientBundle(JSON.parse(text));
      expect(({} as Json).polluted).to.equal(undefined);
      expect(record.resources[0]!.polluted).to.equal(undefined);
    });
  });

  describe('searchRecord', () => {
    let record: PatientRecord;
    before(() => {
      record = readPatientBundle(syntheaBundle('Derek_Becker'));
    });

    it('matches patient as a bare id or as Patient/id, and nothing for another patient', () => {
      const bare = searchRecord(record, 'MedicationRequest', params(`patient=${record.patientId}`));
      const ref = searchRecord(
        record,
        'MedicationRequest',
        params(`subject=Patient/${record.patientId}`),
      );
      expect(bare.length).to.be.greaterThan(0);
      expect(ref).to.deep.equal(bare);
      expect(
        searchRecord(record, 'MedicationRequest', params('patient=someone-else')),
      ).to.deep.equal([]);
    });

    it('finds the patient by _id and patient-linked resources by their patient field', () => {
      expect(searchRecord(record, 'Patient', params(`_id=${record.patientId}`))).to.have.length(1);
      expect(searchRecord(record, 'Patient', params('_id=nope'))).to.have.length(0);
      const claims = searchRecord(record, 'Claim', params(`patient=${record.patientId}`));
      expect(claims.length).to.equal(
        record.resources.filter((r) => r.resourceType === 'Claim').length,
      );
    });

    it('filters by code in every token form', () => {
      const all = (q: string) => searchRecord(record, 'MedicationRequest', params(q)).length;
      const warfarin = all('code=855332');
      expect(warfarin).to.be.greaterThan(0);
      expect(all(`code=${RXNORM}|855332`)).to.equal(warfarin);
      expect(all('code=http://loinc.org|855332')).to.equal(0);
      expect(all('code=|855332')).to.equal(0);
      expect(all(`code=${RXNORM}|`)).to.equal(all(''));
      expect(all('code=855332,849574')).to.equal(warfarin + all('code=849574'));
    });

    it('filters Observations by LOINC code', () => {
      const a1c = searchRecord(record, 'Observation', params('code=http://loinc.org|4548-4'));
      expect(a1c.length).to.be.greaterThan(0);
      for (const obs of a1c) {
        expect(JSON.stringify(obs.code)).to.contain('4548-4');
      }
    });

    it('filters by status, falling back to clinicalStatus for Condition', () => {
      const active = searchRecord(record, 'MedicationRequest', params('status=active'));
      const stopped = searchRecord(record, 'MedicationRequest', params('status=stopped'));
      const both = searchRecord(record, 'MedicationRequest', params('status=active,stopped'));
      expect(active.every((r) => r.status === 'active')).to.equal(true);
      expect(both.length).to.equal(active.length + stopped.length);
      const conditions = searchRecord(record, 'Condition', params('status=resolved'));
      expect(conditions.length).to.be.greaterThan(0);
    });

    it('ANDs a repeated parameter and ignores unsupported ones', () => {
      const q = params('code=855332&code=849574');
      expect(searchRecord(record, 'MedicationRequest', q)).to.deep.equal([]);
      const all = searchRecord(record, 'Observation', params(''));
      expect(
        searchRecord(record, 'Observation', params('_count=1&_sort=-date&date=ge2020')),
      ).to.deep.equal(all);
    });
  });

  describe('buildRequestFromRecord', () => {
    const patientView: PackService = {
      id: 'pv',
      hook: 'patient-view',
      description: 'test',
      prefetch: {
        patient: 'Patient/{{context.patientId}}',
        meds: 'MedicationRequest?patient={{context.patientId}}&status=active',
        user: '{{context.userId}}',
        role: 'PractitionerRole?_id={{userPractitionerRoleId}}',
        missing: 'Observation/does-not-exist',
      },
    };
    const draft: Json = {
      resourceType: 'MedicationRequest',
      status: 'draft',
      intent: 'order',
      medicationCodeableConcept: { coding: [{ system: RXNORM, code: '313782' }] },
    };

    it('builds a patient-view request answered from the record', () => {
      const record = readPatientBundle(syntheaBundle('Derek_Becker'));
      const req = buildRequestFromRecord({ service: patientView, record });
      expect(req.hook).to.equal('patient-view');
      expect(req.context.patientId).to.equal(syntheaPatient('Derek_Becker').patient_id);
      expect(req.context.userId).to.match(/^Practitioner\//);
      expect(req.context.encounterId).to.be.a('string');
      expect(req.context).not.to.have.property('draftOrders');
      const prefetch = req.prefetch!;
      expect((prefetch.patient as Json).id).to.equal(record.patientId);
      const meds = prefetch.meds as {
        type: string;
        total: number;
        entry: Array<{ resource: Json }>;
      };
      expect(meds.type).to.equal('searchset');
      expect(meds.total).to.equal(meds.entry.length);
      expect(meds.entry.every((e) => e.resource.status === 'active')).to.equal(true);
      expect((prefetch.user as Json).resourceType).to.equal('Practitioner');
      // A token with no value: the key is left out, as a client that could not fill it would.
      expect(prefetch).not.to.have.property('role');
      // A read that finds nothing: null (CDS Hooks "no data").
      expect(prefetch.missing).to.equal(null);
    });

    it('uses the latest encounter as encounterId', () => {
      const record = readPatientBundle(syntheaBundle('Derek_Becker'));
      const req = buildRequestFromRecord({ service: patientView, record });
      const encounter = record.resources.find((r) => r.id === req.context.encounterId)!;
      const start = (encounter.period as { start: string }).start;
      expect(start.slice(0, 10)).to.equal(syntheaPatient('Derek_Becker').last_encounter);
    });

    it('builds order-sign draftOrders as a collection Bundle with ids and subjects', () => {
      const record = readPatientBundle(syntheaBundle('Derek_Becker'));
      const service: PackService = { id: 'os', hook: 'order-sign', description: 't' };
      const withId = { ...draft, id: 'mine', subject: { reference: 'Patient/other' } };
      const req = buildRequestFromRecord({
        service,
        record,
        draftOrders: [draft, withId],
        userId: 'Practitioner/me',
      });
      expect(req.context.userId).to.equal('Practitioner/me');
      const bundle = req.context.draftOrders as { type: string; entry: Array<{ resource: Json }> };
      expect(bundle.type).to.equal('collection');
      expect(bundle.entry.map((e) => e.resource.id)).to.deep.equal(['draft-1', 'mine']);
      expect(bundle.entry[0]!.resource.subject).to.deep.equal({
        reference: `Patient/${record.patientId}`,
      });
      expect(bundle.entry[1]!.resource.subject).to.deep.equal({ reference: 'Patient/other' });
      expect(req.context).not.to.have.property('selections');
      expect(draft).not.to.have.property('id');
      expect(req.prefetch).to.deep.equal({});
    });

    it('selects every draft for order-select', () => {
      const record = readPatientBundle(syntheaBundle('Derek_Becker'));
      const service: PackService = { id: 'sel', hook: 'order-select', description: 't' };
      const req = buildRequestFromRecord({ service, record, draftOrders: [draft, draft] });
      expect(req.context.selections).to.deep.equal([
        'MedicationRequest/draft-1',
        'MedicationRequest/draft-2',
      ]);
    });

    it('gives order hooks an empty draftOrders Bundle when no drafts are given', () => {
      const record = readPatientBundle(syntheaBundle('Luigi_Wiegand'));
      const service: PackService = { id: 'os', hook: 'order-sign', description: 't' };
      const req = buildRequestFromRecord({ service, record });
      expect(req.context.draftOrders).to.deep.equal({
        resourceType: 'Bundle',
        type: 'collection',
        entry: [],
      });
    });

    it('throws PackValidationError for an invalid template', () => {
      const record = readPatientBundle(syntheaBundle('Luigi_Wiegand'));
      const service: PackService = {
        id: 'bad',
        hook: 'patient-view',
        description: 't',
        prefetch: { labs: 'Observation?date=gt{{today() - 90 days}}' },
      };
      expect(() => buildRequestFromRecord({ service, record })).to.throw(PackValidationError);
    });

    it('keeps a prefetch key named __proto__ as data', () => {
      const record = readPatientBundle(syntheaBundle('Luigi_Wiegand'));
      const service: PackService = {
        id: 'p',
        hook: 'patient-view',
        description: 't',
        prefetch: JSON.parse('{"__proto__":"Patient/{{context.patientId}}"}') as Record<
          string,
          string
        >,
      };
      const req = buildRequestFromRecord({ service, record });
      expect(Object.keys(req.prefetch!)).to.deep.equal(['__proto__']);
      expect(Object.getPrototypeOf(req.prefetch)).to.equal(Object.prototype);
    });
  });
});
