import { expect } from 'chai';
import fc from 'fast-check';
import { checkPrefetchTemplate, renderPrefetchTemplate } from '../../rules/index.ts';

/**
 * A rendered template is a URL any FHIR server takes: RFC 3986 allows no raw `|` (or `[`, `]`,
 * `^`, `` ` ``, `"`, `<`, `>`, `\`, non-ASCII) in a query, and default Tomcat (HAPI FHIR)
 * refuses one with 400. Literal text and context values are percent-encoded; the `,`
 * OR-separator, the `=`/`&` structure and an author's own escapes are kept.
 */
describe('rules: prefetch templates render to RFC 3986 URLs', () => {
  const context = { userId: 'Practitioner/example', patientId: 'p2', encounterId: 'e1' };
  /** Characters RFC 3986 allows in a query (unreserved, sub-delims, `:@/?`) and `%` escapes. */
  const RFC3986_QUERY = /^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-F]{2})*$/;

  it('encodes the | of system|code tokens and keeps the comma OR-separator', () => {
    expect(
      renderPrefetchTemplate(
        'Observation?patient={{context.patientId}}&code=http://loinc.org|33914-3,http://loinc.org|2160-0',
        context,
      ),
    ).to.equal('Observation?patient=p2&code=http://loinc.org%7C33914-3,http://loinc.org%7C2160-0');
  });

  it('does not double-encode a template the pack author already encoded', () => {
    expect(
      renderPrefetchTemplate(
        'Observation?patient={{context.patientId}}&code=http%3A%2F%2Floinc.org%7C33914-3',
        context,
      ),
    ).to.equal('Observation?patient=p2&code=http%3A%2F%2Floinc.org%7C33914-3');
    // Lower-case escapes stay as the author wrote them (still one escape, not %25..).
    expect(renderPrefetchTemplate('Observation?code=a%7cb', context)).to.equal(
      'Observation?code=a%7cb',
    );
  });

  it('encodes characters a query may not hold raw, and a + (a space to form decoders)', () => {
    expect(renderPrefetchTemplate('Observation?code=a^b[1]"c"<d>\\e`f', context)).to.equal(
      'Observation?code=a%5Eb%5B1%5D%22c%22%3Cd%3E%5Ce%60f',
    );
    expect(
      renderPrefetchTemplate('Observation?date=ge2024-01-01T00:00:00+01:00', context),
    ).to.equal('Observation?date=ge2024-01-01T00:00:00%2B01:00');
    expect(renderPrefetchTemplate('Patient?name=José', context)).to.equal('Patient?name=Jos%C3%A9');
  });

  it('keeps the characters RFC 3986 allows in a query as they are', () => {
    const template = "Observation?_elements=a,b&x=y:z@w/v?u&s=!$'()*;~_.-";
    expect(checkPrefetchTemplate(template)).to.equal(undefined);
    expect(renderPrefetchTemplate(template, context)).to.equal(template);
  });

  it('encodes context values, including their | and comma', () => {
    expect(
      renderPrefetchTemplate('Observation?patient={{context.patientId}}', {
        patientId: 'a|b,c',
      }),
    ).to.equal('Observation?patient=a%7Cb%2Cc');
    expect(
      renderPrefetchTemplate('Observation?value-quantity={{context.n}}', { n: 1e21 }),
    ).to.equal('Observation?value-quantity=1e%2B21');
  });

  it('renders every valid template of query literals to an RFC 3986 URL (property)', () => {
    fc.assert(
      fc.property(
        fc.string({ unit: 'grapheme', maxLength: 30 }),
        fc.string({ unit: 'grapheme', minLength: 1, maxLength: 20 }),
        (value, id) => {
          const template = `Observation?code=${value}&patient={{context.patientId}}`;
          if (checkPrefetchTemplate(template) !== undefined) {
            return;
          }
          const url = renderPrefetchTemplate(template, { patientId: id });
          if (url === undefined) {
            return;
          }
          const query = url.slice('Observation?'.length);
          expect(query).to.match(RFC3986_QUERY);
          // What the author wrote (and the context held) is what the server reads back.
          if (!value.includes('&') && !value.includes('%')) {
            const params = new URLSearchParams(query);
            expect(params.get('code')).to.equal(value);
            expect(params.get('patient')).to.equal(id);
          }
        },
      ),
    );
  });
});
