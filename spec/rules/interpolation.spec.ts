import { expect } from 'chai';
import fc from 'fast-check';
import { compilePack, createEvaluator } from '../../rules/index.ts';
import type { RulePack } from '../../rules/index.ts';
import { buildCard } from '../../rules/evaluate-core.ts';
import { programFor } from '../../rules/compile-pack.ts';
import { collectionText, parseTemplate, staticText } from '../../rules/expression.ts';

const plainText = fc.string({ unit: 'grapheme', maxLength: 200 }).filter((s) => !s.includes('{{'));

function packWithSummary(summary: string, detail: string): RulePack {
  return {
    id: 'interp-pack',
    version: '1.0.0',
    title: 'Interpolation',
    publisher: 'specs',
    description: 'Interpolation identity',
    services: [{ id: 'svc', hook: 'patient-view', description: 'x' }],
    rules: [
      {
        id: 'r',
        service: 'svc',
        when: 'true',
        card: { summary, detail, indicator: 'info', source: { label: 's' } },
      },
    ],
  };
}

describe('rules: {{ }} interpolation', () => {
  it('plain text (no {{) parses as a single literal part (property)', () => {
    fc.assert(
      fc.property(plainText, (text) => {
        const parsed = parseTemplate(text);
        expect(parsed.ok).to.equal(true);
        if (parsed.ok) {
          expect(staticText(parsed.parts)).to.equal(text);
          expect(parsed.parts.every((p) => p.kind === 'text')).to.equal(true);
        }
      }),
      { numRuns: 1000 },
    );
  });

  it('interpolating plain text is the identity (property, through compile and card building)', () => {
    fc.assert(
      fc.property(
        plainText.filter((s) => s.length > 0 && s.length < 140),
        plainText,
        (summary, detail) => {
          const compiled = compilePack(packWithSummary(summary, detail));
          const rule = programFor(compiled.hash, compiled.pack).rules[0]!;
          const card = buildCard(
            'r',
            rule.card,
            {},
            Object.create(null) as Record<string, unknown>,
          );
          expect(card.summary).to.equal(summary);
          expect(card.detail).to.equal(detail);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('is the identity end to end through the evaluator (property)', async () => {
    const inline = createEvaluator({ workers: 0 });
    await fc.assert(
      fc.asyncProperty(
        plainText.filter((s) => s.length > 0 && s.length < 140),
        async (summary) => {
          const compiled = compilePack(packWithSummary(summary, summary));
          const result = await inline.evaluate(compiled, 'svc', {
            hook: 'patient-view',
            hookInstance: 'h',
            context: {},
            prefetch: {},
            now: new Date(),
          });
          expect(result.cards[0]?.summary).to.equal(summary);
        },
      ),
      { numRuns: 100 },
    );
    await inline.close();
  });

  it('splits text and expressions, with positions', () => {
    expect(parseTemplate('a {{ %x }} b\nc {{%y}}')).to.deep.equal({
      ok: true,
      parts: [
        { kind: 'text', text: 'a ' },
        { kind: 'expr', expr: ' %x ', line: 1, column: 5 },
        { kind: 'text', text: ' b\nc ' },
        { kind: 'expr', expr: '%y', line: 2, column: 5 },
      ],
    });
    expect(parseTemplate('x {{ }}')).to.deep.equal({
      ok: false,
      message: 'empty {{ }} at column 3',
    });
    expect(parseTemplate('}} {{ %a } }')).to.deep.equal({
      ok: false,
      message: 'unterminated {{ at column 4',
    });
  });

  it('prints collections joined with ", " and the empty collection as nothing', () => {
    expect(collectionText([])).to.equal('');
    expect(collectionText(['a', 1, true, 2.5])).to.equal('a, 1, true, 2.5');
    expect(
      collectionText([
        { value: 28, unit: 'mL/min' },
        { system: 's', code: 'c' },
        { coding: [{ code: 'x', display: 'X' }] },
      ]),
    ).to.equal('28 mL/min, c, X');
    expect(() => collectionText([{ resourceType: 'Bundle' }])).to.throw('complex value');
  });
});
