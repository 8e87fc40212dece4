import { expect } from 'chai';
import path from 'node:path';
import fc from 'fast-check';
import {
  checkPrefetchTemplate,
  PackValidationError,
  renderPrefetchTemplate,
} from '../../rules/index.ts';
import { FIXTURES, readJson } from './content-fixtures.ts';

describe('rules/prefetch-template', () => {
  describe('checkPrefetchTemplate', () => {
    const valid = [
      'Patient/{{context.patientId}}',
      'Patient/example',
      '{{context.userId}}',
      'Encounter/{{context.encounterId}}',
      'MedicationRequest?patient={{context.patientId}}&status=active',
      'Observation?patient={{context.patientId}}&code=http://loinc.org|33914-3&_sort=-date&_count=5',
      'Observation?patient={{context.patientId}}&date=ge2020-01-01',
      'Condition?patient={{ context.patientId }}&code:in=http://example.org/vs',
      'PractitionerRole?_id={{userPractitionerRoleId}}',
      'Practitioner/{{userPractitionerId}}',
      'Patient?_id={{userPatientId}}',
      'RelatedPerson/{{userRelatedPersonId}}',
      'Observation',
      'Observation?name=a%20b',
    ];
    for (const template of valid) {
      it(`accepts ${template}`, () => {
        expect(checkPrefetchTemplate(template)).to.equal(undefined);
      });
    }

    it('accepts every template of the CDS Hooks 2.0 spec example', () => {
      const file = path.join(FIXTURES, 'cds-hooks-spec/2.0/prefetch-templates.json');
      const { prefetch } = readJson(file) as { prefetch: Record<string, string> };
      for (const template of Object.values(prefetch)) {
        expect(checkPrefetchTemplate(template), template).to.equal(undefined);
      }
    });

    const invalid: Array<[string, string, RegExp]> = [
      ['empty', '', /non-empty/],
      ['a 3.0 relative-date token', 'Observation?date=ge{{today() - 90 days}}', /3\.0-ballot/],
      [
        'a nested context path',
        'Medication/{{context.draftOrders.entry.resource.medication.id}}',
        /nested context paths/,
      ],
      ['an object-valued context field', 'Bundle/{{context.draftOrders}}', /root primitive/],
      ['a selections token', 'MedicationRequest?_id={{context.selections}}', /root primitive/],
      ['an unknown user token', 'Practitioner/{{userId}}', /not a CDS Hooks 2\.0 prefetch token/],
      ['an empty token', 'Patient/{{}}', /not a CDS Hooks 2\.0 prefetch token/],
      ['an unclosed token', 'Patient/{{context.patientId', /unbalanced/],
      ['a stray brace', 'Patient/{context.patientId}', /unbalanced/],
      ['an absolute URL', 'https://ehr.example.org/fhir/Patient/1', /relative/],
      ['a leading slash', '/Patient/1', /relative|resource type/],
      ['a misspelt resource type', 'Observaton?patient={{context.patientId}}', /Observaton/],
      ['a lower-case type', 'patient/1', /not a FHIR R4 resource type/],
      ['a sub-path', 'Patient/{{context.patientId}}/_history', /read must be/],
      ['an operation', 'Patient/1/$everything', /not a FHIR id/],
      ['a dot-dot id', 'Patient/..', /not a FHIR id/],
      ['a read with a query', 'Patient/1?_elements=id', /not a FHIR id/],
      ['userId inside a read', 'Practitioner/{{context.userId}}', /whole template/],
      ['a bare id token', '{{context.patientId}}', /resource type/],
      ['whitespace', 'Observation?code=a b', /whitespace/],
      ['a newline', 'Observation?code=a\nb', /whitespace/],
      ['a fragment', 'Observation?code=a#frag', /fragment/],
      ['a bad escape', 'Observation?code=%zz', /%-escape/],
      ['a parameter without a value', 'Observation?patient={{context.patientId}}&code', /no value/],
      ['a bad parameter name', 'Observation?=x', /not a search parameter name/],
      ['an over-long template', `Observation?code=${'a'.repeat(3000)}`, /longer than/],
    ];
    for (const [name, template, message] of invalid) {
      it(`rejects ${name}`, () => {
        expect(checkPrefetchTemplate(template)).to.match(message);
      });
    }

    it('rejects the 3.0-ballot FHIRPath templates of the spec fixtures', () => {
      const dir = path.join(FIXTURES, 'cds-hooks-spec/3.0-ballot');
      const files = ['prefetch-relative-date-fhirpath.json', 'prefetch-chained-fhirpath.json'];
      for (const file of files) {
        const { prefetch } = readJson(path.join(dir, file)) as { prefetch: Record<string, string> };
        const problems = Object.values(prefetch).map((t) => checkPrefetchTemplate(t));
        expect(
          problems.some((p) => p !== undefined),
          file,
        ).to.equal(true);
      }
    });

    it('never throws, whatever the input', () => {
      fc.assert(
        fc.property(fc.string(), (s) => {
          const problem = checkPrefetchTemplate(s);
          expect(problem === undefined || typeof problem === 'string').to.equal(true);
        }),
      );
    });
  });

  describe('renderPrefetchTemplate', () => {
    const context = {
      userId: 'Practitioner/example',
      patientId: '1288992',
      encounterId: '89284',
    };

    it('fills context tokens', () => {
      expect(
        renderPrefetchTemplate('Observation?patient={{context.patientId}}&code=4548-4', context),
      ).to.equal('Observation?patient=1288992&code=4548-4');
    });

    it('fills the user tokens from a userId of the matching type', () => {
      expect(renderPrefetchTemplate('Practitioner/{{userPractitionerId}}', context)).to.equal(
        'Practitioner/example',
      );
      expect(
        renderPrefetchTemplate('PractitionerRole?_id={{userPractitionerRoleId}}', {
          userId: 'PractitionerRole/r-1',
        }),
      ).to.equal('PractitionerRole?_id=r-1');
    });

    it('gives undefined for a user token of another resource type', () => {
      expect(renderPrefetchTemplate('PractitionerRole?_id={{userPractitionerRoleId}}', context)).to
        .be.undefined;
      expect(renderPrefetchTemplate('Patient/{{userPatientId}}', context)).to.be.undefined;
    });

    it('keeps the slash of context.userId used as a whole read', () => {
      expect(renderPrefetchTemplate('{{context.userId}}', context)).to.equal(
        'Practitioner/example',
      );
    });

    it('gives undefined when a context field is absent, empty or not primitive', () => {
      expect(renderPrefetchTemplate('Encounter/{{context.encounterId}}', { patientId: '1' })).to.be
        .undefined;
      expect(renderPrefetchTemplate('Encounter/{{context.encounterId}}', { encounterId: '' })).to.be
        .undefined;
      expect(renderPrefetchTemplate('Encounter/{{context.encounterId}}', { encounterId: { a: 1 } }))
        .to.be.undefined;
    });

    it('does not read inherited properties of the context', () => {
      expect(renderPrefetchTemplate('Patient/{{context.constructor}}', {})).to.be.undefined;
      expect(renderPrefetchTemplate('Patient/{{context.toString}}', {})).to.be.undefined;
    });

    it('URL-encodes values so a hostile id cannot change the path or the query', () => {
      const url = renderPrefetchTemplate('Patient/{{context.patientId}}', {
        patientId: '1/../../admin?x=1&y',
      });
      expect(url).to.equal('Patient/1%2F..%2F..%2Fadmin%3Fx%3D1%26y');
      expect(
        renderPrefetchTemplate('Observation?patient={{context.patientId}}', { patientId: 'a&b=c' }),
      ).to.equal('Observation?patient=a%26b%3Dc');
    });

    it('refuses dot segments and malformed user references', () => {
      expect(renderPrefetchTemplate('Patient/{{context.patientId}}', { patientId: '..' })).to.be
        .undefined;
      expect(renderPrefetchTemplate('{{context.userId}}', { userId: 'Practitioner/../x' })).to.be
        .undefined;
      expect(renderPrefetchTemplate('{{context.userId}}', { userId: 'no-slash' })).to.be.undefined;
      expect(
        renderPrefetchTemplate('Practitioner/{{userPractitionerId}}', {
          userId: 'Practitioner/..',
        }),
      ).to.be.undefined;
    });

    it('throws PackValidationError for an invalid template', () => {
      expect(() => renderPrefetchTemplate('Observation?date=ge{{today()}}', context))
        .to.throw(PackValidationError)
        .with.property('problems')
        .that.deep.equals([
          {
            path: 'prefetch',
            message:
              "'{{today()}}' is not a CDS Hooks 2.0 prefetch token (FHIRPath tokens are 3.0-ballot only)",
          },
        ]);
    });

    it('renders the spec example templates from the spec example context', () => {
      const dir = path.join(FIXTURES, 'cds-hooks-spec/2.0');
      const { prefetch } = readJson(path.join(dir, 'prefetch-templates.json')) as {
        prefetch: Record<string, string>;
      };
      const request = readJson(path.join(dir, 'patient-view-request.json')) as {
        context: Record<string, unknown>;
      };
      expect(renderPrefetchTemplate(prefetch.patient!, request.context)).to.equal(
        `Patient/${String(request.context.patientId)}`,
      );
    });

    it('renders to a URL that passes the template check for any id-shaped value (property)', () => {
      fc.assert(
        fc.property(fc.stringMatching(/^[A-Za-z0-9\-.]{1,64}$/), (id) => {
          fc.pre(id !== '.' && id !== '..');
          const url = renderPrefetchTemplate('Patient/{{context.patientId}}', { patientId: id });
          expect(url).to.be.a('string');
          expect(checkPrefetchTemplate(url!)).to.equal(undefined);
        }),
      );
    });

    it('renders each call from its own context when a template is rendered again (parsed once, kept)', () => {
      const template = 'MedicationRequest?patient={{context.patientId}}&code=http://x.org|a%20b';
      for (const id of ['p1', 'p2', 'p 3', 'p1']) {
        expect(renderPrefetchTemplate(template, { patientId: id })).to.equal(
          `MedicationRequest?patient=${encodeURIComponent(id)}&code=http://x.org%7Ca%20b`,
        );
      }
      expect(renderPrefetchTemplate(template, {})).to.equal(undefined);
    });

    it('refuses an invalid template on every render, and renders past the number of templates it keeps', () => {
      for (let i = 0; i < 2; i += 1) {
        expect(() => renderPrefetchTemplate('Patient/{{context.draftOrders}}', {})).to.throw(
          PackValidationError,
        );
      }
      // More distinct templates than are kept parsed (512): each renders right, in and out of turn.
      for (let round = 0; round < 2; round += 1) {
        for (let i = 0; i < 600; i += 1) {
          expect(
            renderPrefetchTemplate(`Observation?code=c${String(i)}&patient={{context.patientId}}`, {
              patientId: `x${String(i)}`,
            }),
          ).to.equal(`Observation?code=c${String(i)}&patient=x${String(i)}`);
        }
      }
    });
  });
});
