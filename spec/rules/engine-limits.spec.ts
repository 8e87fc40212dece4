/**
 * Hostile packs against the engine's limits (audit 5): a long FHIRPath chain must not freeze
 * the compiler or the evaluation workers (1, 5); building a giant string must not escape the
 * main thread's slice nor produce a giant card (2); `source.url`/`icon` are never interpolated
 * (3); a trace error never carries a value of the call's data (4).
 */
import { expect } from 'chai';
import fc from 'fast-check';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import {
  compilePack,
  createEvaluator,
  PackValidationError,
  validatePack,
} from '../../rules/index.ts';
import type { EvaluationInput, PackProblem, PackRule, RulePack } from '../../rules/index.ts';
import { compileProgram } from '../../rules/compile-pack.ts';
import {
  buildFunctionTable,
  compileExpression,
  EXPRESSION_LIMITS,
  expressionSize,
  safeErrorMessage,
  SafeEvalError,
} from '../../rules/expression.ts';
import {
  compileFast,
  FAST_PATH_AVAILABLE,
  HandOff,
  runGuarded,
  STRING_LIMIT,
  withFallback,
} from '../../rules/fast-path.ts';
import { CARD_TEXT_LIMIT } from '../../rules/compile-pack.ts';

type Json = Record<string, unknown>;

function rule(id: string, when: string, card: Partial<PackRule['card']> = {}): PackRule {
  return {
    id,
    service: 'svc',
    when,
    card: { summary: `card of ${id}`, indicator: 'info', source: { label: 'specs' }, ...card },
  };
}

function pack(rules: PackRule[], extra: Partial<RulePack> = {}): RulePack {
  return {
    id: 'limits-pack',
    version: '1.0.0',
    title: 'Limits pack',
    publisher: 'specs',
    description: 'Hostile expressions',
    services: [{ id: 'svc', hook: 'patient-view', description: 'd' }],
    rules,
    ...extra,
  };
}

function input(prefetch: Json = {}): EvaluationInput {
  return {
    hook: 'patient-view',
    hookInstance: 'h',
    context: { patientId: 'p1', userId: 'Practitioner/u' },
    prefetch,
    now: new Date('2024-02-29T10:15:00.000Z'),
  };
}

async function problemsOf(raw: unknown): Promise<PackProblem[]> {
  try {
    await validatePack(raw, { runTests: false });
  } catch (err) {
    expect(err, err instanceof Error ? err.message : String(err)).to.be.instanceOf(
      PackValidationError,
    );
    return (err as PackValidationError).problems;
  }
  return expect.fail('expected a PackValidationError');
}

/** `%s<n>` doubles `%s<n-1>`: `%s<n>` is 2^n characters of 'x'. */
function doublingLets(n: number): Record<string, string> {
  const lets: Record<string, string> = { s0: "'x'" };
  for (let i = 1; i <= n; i++) {
    lets[`s${i}`] = `%s${i - 1} + %s${i - 1}`;
  }
  return lets;
}

const chain = (steps: number) => `%context${'.where(true)'.repeat(steps)}.exists()`;

describe('rules: engine limits (hostile packs)', function () {
  this.timeout(120_000);

  describe('1. a long FHIRPath chain cannot freeze compilation', () => {
    it('compiles a 1,000-step chain on the fast path in linear time', () => {
      expect(FAST_PATH_AVAILABLE).to.equal(true);
      const t0 = performance.now();
      const fn = compileFast(chain(1000), { raw: false, valueSets: new Map() });
      const ms = performance.now() - t0;
      expect(fn).to.not.equal(undefined);
      // Cubic before: 400 steps took seconds, 1,000 would take minutes.
      expect(ms).to.be.below(2000);
      const vars = Object.create(null) as Json;
      vars.context = { patientId: 'p' };
      expect(fn?.({ patientId: 'p' }, vars)).to.deep.equal([true]);
    });

    it('compiles 40 nested `and`s on the fast path in linear time (was exponential)', () => {
      const expr = `${'true and ('.repeat(40)}true${')'.repeat(40)}`;
      const t0 = performance.now();
      const fn = compileFast(expr, { raw: false, valueSets: new Map() });
      expect(performance.now() - t0).to.be.below(2000);
      expect(fn?.({}, Object.create(null) as Json)).to.deep.equal([true]);
    });

    const refused: Array<[string, string, RegExp]> = [
      [
        'an expression over the length limit (the 48 KB chain)',
        chain(4000),
        /^expression is 48017 characters long \(limit 8192\)/,
      ],
      [
        'a chain nested deeper than the AST depth limit',
        chain(600),
        /^expression nests too deeply \(more than 256 levels\)/,
      ],
      [
        'an expression of 130 number literals (each counts as 64 characters: fhirpath.js parses them slowly)',
        `${Array.from({ length: 130 }, () => '1').join(' + ')} > 0`,
        /^expression is too large: 8774 characters, counting each number literal as 64 \(limit 8192\)/,
      ],
      [
        'function calls nested deeper than the nesting limit',
        `${'%context.where('.repeat(70)}true${').exists()'.repeat(70)}`,
        /^expression nests more than 64 brackets deep/,
      ],
    ];
    for (const [what, when, message] of refused) {
      it(`validation refuses ${what}, at the rule's path`, async () => {
        const t0 = performance.now();
        const problems = await problemsOf(pack([rule('deep', when)]));
        expect(performance.now() - t0).to.be.below(5000);
        expect(problems.map((p) => p.path)).to.deep.equal(['rules[0].when']);
        expect(problems[0]?.message).to.match(message);
      });
    }

    it('validation refuses the same in a let and in a card interpolation', async () => {
      const problems = await problemsOf(
        pack([rule('rr', 'true', { detail: `x {{ ${chain(600)} }}` })], {
          let: { deep: chain(4000) },
        }),
      );
      expect(problems.map((p) => p.path).sort()).to.deep.equal([
        'let.deep',
        'rules[0].card.detail',
      ]);
    });

    it("validation refuses a pack whose expressions together exceed the pack's budget", async () => {
      const big = `%context.patientId = '${'a'.repeat(7000)}'`;
      const rules = Array.from({ length: 40 }, (_, i) => rule(`r${i}`, big));
      const problems = await problemsOf(pack(rules));
      expect(problems).to.have.length(1);
      expect(problems[0]?.path).to.match(/^rules\[\d+\]\.when$/);
      expect(problems[0]?.message).to.match(
        new RegExp(`^the pack's expressions exceed ${EXPRESSION_LIMITS.packChars} characters`),
      );
    });

    it('compilePack refuses the hostile chain too (a pack stored before the limits)', () => {
      const t0 = performance.now();
      expect(() => compilePack(pack([rule('deep', chain(4000))]))).to.throw(PackValidationError);
      expect(performance.now() - t0).to.be.below(2000);
    });

    it('compiles the largest pack validation accepts within the call budget', async () => {
      // Chains just under the depth limit, up to the pack's budget.
      const when = (i: number) => `${chain(200)} and %context.patientId = 'p${i}'`;
      const rules: PackRule[] = [];
      let size = 0;
      for (let i = 0; ; i++) {
        const s = expressionSize(when(i)).size;
        if (size + s > EXPRESSION_LIMITS.packChars) {
          break;
        }
        size += s;
        rules.push(rule(`r${i}`, when(i)));
      }
      const p = pack(rules);
      await validatePack(p, { runTests: false });
      const t0 = performance.now();
      compileProgram(p, 'budget-check');
      const ms = performance.now() - t0;
      // What a worker pays before a pack's first call (2,000 ms: the default call budget).
      expect(ms, `${rules.length} expressions`).to.be.below(2000);
    });
    it('a pack whose compilation outlasts a call counts against it, and is not compiled ahead again', async () => {
      const rules: PackRule[] = [];
      for (let i = 0; i < 20; i++) {
        rules.push(rule(`r${i}`, `${chain(200)} and %context.patientId = 'p${i}'`));
      }
      const compiled = compilePack(pack(rules));
      const ev = createEvaluator({ workers: 1, callBudgetMs: 40 });
      try {
        await ev.ready();
        const result = await ev.evaluate(compiled, 'svc', input());
        expect(result.trace.every((t) => t.error === 'call budget exhausted')).to.equal(true);
        expect(ev.stats()).to.include({ compileOverruns: 1 });
        ev.warm(compiled);
        await ev.evaluate(compiled, 'svc', input());
        expect(ev.stats().compileOverruns).to.equal(1);
      } finally {
        await ev.close();
      }
    });
  });

  describe('2. building a giant string escapes neither the slice nor the card', () => {
    it('a string past the limit is a rule error on the fast path, never left to fhirpath.js', () => {
      const vars = Object.create(null) as Json;
      vars.s = 'x'.repeat(STRING_LIMIT / 2 + 1);
      const fast = compileFast('%s + %s', { raw: true, valueSets: new Map() });
      expect(fast).to.not.equal(undefined);
      const slow = compileExpression('%s + %s', buildFunctionTable(new Map()), true);
      const both = withFallback(fast, slow);
      expect(() => both({}, vars)).to.throw(SafeEvalError, /longer than 65536 characters/);
      // In the calling thread it hands the call to a worker instead.
      expect(() =>
        runGuarded(1000, () => both({}, Object.assign(Object.create(null), vars))),
      ).to.throw(HandOff);
    });

    it('a fhirpath.js result holding a string past the limit is a rule error too', () => {
      const vars = Object.create(null) as Json;
      vars.s = 'x'.repeat(STRING_LIMIT / 2 + 1);
      // trace() is not on the fast path: fhirpath.js builds it, and its result is refused.
      const slow = compileExpression("(%s + %s).trace('t')", buildFunctionTable(new Map()), true);
      const both = withFallback(
        compileFast("(%s + %s).trace('t')", { raw: true, valueSets: new Map() }),
        slow,
      );
      expect(() => both({}, vars)).to.throw(SafeEvalError, /longer than 65536 characters/);
    });

    it('charges string comparisons by length: long equal strings use up the slice', () => {
      const vars = Object.create(null) as Json;
      // Distinct string objects with equal text: each comparison reads all of it.
      vars.list = Array.from({ length: 1000 }, () => 'y'.repeat(60_000));
      vars.other = 'y'.repeat(60_000);
      const fast = compileFast('%list.where($this = %other).count()', {
        raw: false,
        valueSets: new Map(),
      });
      expect(fast).to.not.equal(undefined);
      expect(() => runGuarded(1, () => fast?.({}, vars))).to.throw(HandOff);
    });

    it('27 doubling lets hold the calling thread about a slice, and fail in the worker', async () => {
      const ev = createEvaluator({ workers: 1, inlineSliceMs: 5, callBudgetMs: 10_000 });
      try {
        await ev.ready();
        const compiled = compilePack(
          pack([rule('r1', "%s27.substring(5, 1) = 'x'")], { let: doublingLets(27) }),
        );
        const t0 = performance.now();
        const pending = ev.evaluate(compiled, 'svc', input());
        const heldMs = performance.now() - t0;
        const result = await pending;
        expect(heldMs).to.be.below(150);
        expect(result.trace.map((t) => t.status)).to.deep.equal(['error']);
        const failed = result.lets?.find(
          (l) => l.status === 'error' && /65536/.test(l.error ?? ''),
        );
        expect(failed?.name, JSON.stringify(result.lets)).to.equal('s17');
        expect(ev.stats()).to.include({ inline: 0, handedOff: 1 });
      } finally {
        await ev.close();
      }
    });

    it('an interpolated card field past its limit fails the rule (a suggestion: drops it), naming the field', async () => {
      const ev = createEvaluator({ workers: 1, inlineSliceMs: 5, callBudgetMs: 10_000 });
      try {
        await ev.ready();
        const compiled = compilePack(
          pack(
            [
              rule('big-detail', 'true', { detail: '{{ %s15 }}' }),
              rule('big-label', 'true', {
                suggestions: [
                  {
                    label: 'ok',
                    actions: [
                      {
                        type: 'create',
                        description: 'd',
                        resource: { resourceType: 'Task', status: 'draft', note: '{{ %s15 }}' },
                      },
                    ],
                  },
                ],
              }),
              rule('fine', 'true', { detail: '{{ %s10 }}' }),
            ],
            { let: doublingLets(15) },
          ),
        );
        const result = await ev.evaluate(compiled, 'svc', input());
        expect(result.trace.map((t) => [t.ruleId, t.status, t.error])).to.deep.equal([
          [
            'big-detail',
            'error',
            `card.detail: longer than ${CARD_TEXT_LIMIT} characters after interpolation`,
          ],
          [
            'big-label',
            'fired',
            `suggestion dropped: card.suggestions[0].actions[0].resource: longer than ${CARD_TEXT_LIMIT} characters after interpolation`,
          ],
          ['fine', 'fired', undefined],
        ]);
        // big-label's card goes without its suggestion (the alert matters more).
        expect(result.cards.map((c) => [c.ruleId, c.detail?.length, c.suggestions])).to.deep.equal([
          ['big-label', undefined, undefined],
          ['fine', 1024, undefined],
        ]);
      } finally {
        await ev.close();
      }
    });

    it('validation refuses an interpolated field whose static text is over the limit', async () => {
      const problems = await problemsOf(
        pack([
          rule('rr', 'true', { detail: `${'d'.repeat(CARD_TEXT_LIMIT)} {{ %context.patientId }}` }),
        ]),
      );
      expect(problems).to.deep.equal([
        {
          path: 'rules[0].card.detail',
          message: `must be at most ${CARD_TEXT_LIMIT} characters after interpolation (static text is ${CARD_TEXT_LIMIT + 1})`,
        },
      ]);
    });
  });

  describe('3. source.url and source.icon are never interpolated', () => {
    for (const field of ['url', 'icon'] as const) {
      it(`validation refuses {{ }} in source.${field}`, async () => {
        const problems = await problemsOf(
          pack([
            rule('rr', 'true', {
              source: { label: 'x', [field]: 'https://{{ %context.patientId }}.example.org/' },
            }),
          ]),
        );
        expect(problems).to.deep.equal([
          {
            path: `rules[0].card.source.${field}`,
            message: 'is not interpolated: {{ }} is not allowed here',
          },
        ]);
      });
    }
  });

  describe('4. trace errors carry no value of the call', () => {
    const PLANTED = 'Okafor-Smith MRN 00123456';

    it('keeps no planted value in the errors of real evaluations', async () => {
      const ev = createEvaluator({ workers: 1, inlineSliceMs: 5, callBudgetMs: 10_000 });
      try {
        await ev.ready();
        const compiled = compilePack(
          pack(
            [
              rule('plus', '%patient.name.family.first() + 1 > 2'),
              rule('minus', '%patient.identifier.value.first() - 1 > 0'),
              rule('times', '%patient.name.family.first() * 2 > 0'),
              rule('decimal', '%patient.name.family.first().toDecimal() + 1 > 0'),
              rule('round', '%patient.name.family.first().round() > 0'),
              rule('singleton', '%patient.identifier.value + 1 > 0'),
              rule('in', "'a' in %patient.identifier.value"),
              rule('unary', '-(%patient.identifier.value) > 0'),
              rule('abs', '%patient.identifier.value.first().abs() > 0'),
              rule('sort', '%patient.name.sort($this).exists()'),
              rule('is', '%patient.identifier.value is String'),
              rule('not', '%patient.identifier.value.not()'),
              rule('date', '%patient.identifier.value.first() < @2020-01-01'),
            ],
            {
              services: [
                {
                  id: 'svc',
                  hook: 'patient-view',
                  description: 'd',
                  prefetch: { patient: 'Patient/{{context.patientId}}' },
                },
              ],
            },
          ),
        );
        const result = await ev.evaluate(
          compiled,
          'svc',
          input({
            patient: {
              resourceType: 'Patient',
              id: 'p1',
              name: [{ family: 'Okafor-Smith' }],
              identifier: [{ value: 'MRN 00123456' }, { value: 'MRN 00123456 b' }],
            },
          }),
        );
        for (const t of result.trace) {
          const text = t.error ?? '';
          for (const part of PLANTED.split(' ')) {
            expect(text, `${t.ruleId}: ${text}`).to.not.include(part);
          }
        }
        expect(result.trace.filter((t) => t.status === 'error').length).to.be.greaterThan(8);
      } finally {
        await ev.close();
      }
    });

    /**
     * Every `throw new Error(...)` of fhirpath.js, as a message template: `$` where a value
     * (possibly from the call's data) goes. The count per file is checked against fhirpath.js's
     * source, so a new version's messages cannot slip by unreviewed.
     */
    const THROWS: Record<string, string[]> = {
      'strings.js': [
        'Join requires a collection of strings.',
        "Decode 'hex' requires an even number of characters.",
        'matches/matchesFull flags must only contain i and/or m',
      ],
      'fhirpath.js': [
        'Unary - can only be applied to an individual number or Quantity.',
        'Unary - can only be applied to a number or Quantity. (at 1:1)',
        'Expected TypeSpecifier node, got $',
        '"$" cannot be resolved to a valid type identifier',
        'Attempting to access an undefined environment variable: $',
        'Invalid date literal: $',
        'Invalid date-time literal: $',
        'Invalid time literal: $',
        'Expected identifier node, got $',
        '$ expects no params',
        'Not implemented: $',
        'Infix invoke should have arity 2',
        'Not impl $',
        'Do not know how to alias $ by $',
        'Instance selector requires an input collection with at most one item, but it has $ items. (at 1:1)',
        'Instance selector only supports the FHIR namespace, not "$"',
        'Invalid type name in instance selector: $',
        'Instance selector requires a FHIR model context',
        '"$" cannot be resolved to a valid type identifier (at 1:1)',
        'Instance selector element "$" is already assigned (at 1:1)',
        'No $ evaluator ',
        'The "signal" option is only supported for asynchronous functions.',
        'Evaluation of the expression was aborted before it started.',
        'The "httpHeaders" option is only supported for asynchronous functions.',
        'Passing a signal to compile() whose result is used more than once is not allowed.',
      ],
      'collections.js': [
        'Expected singleton on right side of contains, got $',
        'Expected singleton on right side of in, got $',
      ],
      'instance-selector.js': [
        'Instance selector element "$" is not allowed (at 1:1)',
        'Instance selector element "$" is not allowed; use a FHIR primitive constructor for metadata',
        '"$" is not a valid element for type "$" (at 1:1)',
        'Instance selector element "$" is not repeating, but its expression returned $ items',
        'Instance selector element "$" expects type "$"',
        '"$" cannot contain multiple concrete choice types',
        'Instance selector element "$" is already assigned',
        'Instance selector element "$" is not repeating, but its expression returned $ items',
        'Instance selector metadata element "$" must use a concrete choice name',
        'Instance selector element "$" is already assigned',
        'Instance selector BackboneElement values must come from a typed FHIRPath result',
        'Instance selector metadata element "$" has invalid metadata shape',
        '"$" cannot be resolved to a concrete choice type for value type "$"',
        '"$" is not a valid element for "$"',
      ],
      'terminologies.js': [
        'No terminology server could satisfy the request.',
        'The terminology request could not be built.',
        'The valueset does not have a single code system.',
        'The value for "$" should be an integer.',
        'The value for "$" should be a boolean.',
        'The value for "$" is not expected to be passed via a URL encoded string with parameters.',
        'Unexpected resourceType in response: $',
      ],
      'misc.js': [
        'Environment Variable %$ already defined',
        'Variable %$ already defined',
        'Unexpected collection$; expected singleton of type Boolean',
        'Expected integer, but got: $',
        'Not supported type $',
      ],
      'types.js': [
        'equals() is not implemented for $',
        'equivalentTo() is not implemented for $',
        'toNumber() is not implemented for $',
        'toNumber() is not implemented for $',
        '$ cannot be converted to Long (BigInt)',
        'Comparison not implemented for $',
        'Addition for $ is not implemented',
        'Subtraction for $ is not implemented',
        'Negation for $ is not implemented',
        'Multiplication for $ is not implemented',
        'Division for $ is not implemented',
        'abs() for $ is not implemented',
        'ceiling() for $ is not implemented',
        'floor() is not implemented for $',
        'round() is not implemented for $',
        'lowBoundary() is not implemented for $',
        'highBoundary() is not implemented for $',
        'truncate() is not implemented for $',
        'Cannot substract a date/time based value from a quantity',
        'For date/time arithmetic, the unit of the quantity must be one of the following time-based units: year,month',
        'Unsupported unit for +.  The unit should be one of year, month.',
        'For date/time arithmetic, the unit of the quantity must be one of the following time-based units: $',
        'Cannot convert a FHIR.Quantity that has a comparator',
        "Expected singleton on left side of 'is', got $",
        "Expected singleton on left side of 'as', got $",
        'divToInt() is not implemented for $',
        'mod() is not implemented for $',
        'exp() is not implemented for $',
        'ln() is not implemented for $',
        'log() is not implemented for $',
        'power() is not implemented for $',
        'sqrt() is not implemented for $',
        'Invalid decimal value: $',
        'Cannot convert $ to decimal',
        'Invalid decimal value: $',
        'Cannot convert $ to a number',
        'Invalid decimal value: $',
        'Cannot convert $ to a decimal',
        'Cannot convert $ to Decimal',
      ],
      'sdc-ig-supplements.js': [
        'The weight()/ordinal() function is not supported for the current model.',
        'Questionnaire item with this linkId were not found: $.',
        '%questionnaire is needed but not specified.',
        'Cannot find a contained value set with id: $.',
        'The asynchronous function "weight"/"ordinal" is not allowed. $',
        'Option "terminologyUrl" is not specified.',
      ],
      'math.js': [
        'Cannot $ - $',
        'Cannot $ - $',
        'Cannot $ * $',
        'Cannot $ / $',
        'Unexpected collection$; expected number',
        'Expected Decimal, Date, DateTime, or Time, but got $',
        'Expected a number or a Quantity, but got $',
        'Expected a number or a Quantity, but got $',
        'Expected a number, but got $',
        'Expected a number or a Quantity, but got $',
        'Expected a number, but got $',
        'Expected a number, but got $',
        'Expected a number, but got $',
        'Expected a number or a Quantity, but got $',
        'Expected a number, but got $',
        'Expected a number or a Quantity, but got $',
      ],
      'additional.js': [
        'Option "terminologyUrl" is not specified.',
        'Option "fhirServerUrl" is not specified.',
        'Option "fhirServerUrl" is not specified.',
      ],
      'filtering.js': [
        'Cannot sort incomparable values',
        'Cannot sort by non-primitive type: $',
        'Cannot sort by non-primitive type: $',
        'Expected single',
      ],
      'utilities.js': ['$', 'The asynchronous function "$" is not allowed. $'],
      'factory.js': [
        ...[
          'string',
          'an integer',
          'an unsignedInt',
          'a positiveInt',
          'a big integer',
          'a markdown',
          'a url',
          'a uri',
          'an instant',
          'a time',
          'a date',
          'a dateTime',
          'a base64Binary',
          'a boolean',
          'a code',
          'an id',
          'an oid',
          'an uuid',
          'an canonical',
        ].map((t) => `"$" is not ${t === 'string' ? 'a string' : t}.`),
        'Unexpected collection $; expected singleton of type Extension',
        'Expected "FHIR.Extension", got "$"',
        'Unexpected collection $; expected singleton of type Coding',
        'Unexpected empty collection $; expected singleton of type Coding',
        'Unexpected collection $; expected singleton of type String',
        'Expected "FHIR.CodeableConcept", got "$"',
        'Expected string, but got: $',
        'Expected string, but got: $',
        'Unexpected value $; expected value of type Coding',
        "%factory.create(type) doesn't support system types.",
        'Unexpected collection $; expected singleton of type Resource',
        'Unexpected collection $; expected singleton of type String',
        'Unexpected empty collection $; expected singleton of type String',
        'Expected a ResourceNode.',
        'Unexpected collection $; expected singleton of type Resource',
        'Unexpected collection $; expected singleton of type String',
        'Unexpected empty collection $; expected singleton of type String',
        'Expected a ResourceNode.',
      ],
    };

    it("lists every `new Error(` of fhirpath.js's source", () => {
      const req = createRequire(import.meta.url);
      const src = path.join(path.dirname(req.resolve('fhirpath/package.json')), 'src');
      const counts: Record<string, number> = {};
      for (const file of fs.readdirSync(src)) {
        if (!file.endsWith('.js')) {
          continue;
        }
        const n = fs.readFileSync(path.join(src, file), 'utf8').split('new Error(').length - 1;
        if (n > 0) {
          counts[file] = n;
        }
      }
      const listed = Object.fromEntries(Object.entries(THROWS).map(([f, m]) => [f, m.length]));
      expect(listed).to.deep.equal(counts);
    });

    /** Values as fhirpath.js would put them in its messages: raw, or JSON as util.toJSON gives. */
    // [planted value, the part of it that must never come out]: names, identifiers, dates, and
    // values shaped like the code-written parts of messages around them.
    const planted = fc
      .tuple(
        fc.constantFrom(
          ['Okafor-Smith', 'Okafor'],
          ['MRN 00123456', '00123456'],
          ['1985-04-12', '1985-04-12'],
          ['Zebulon Q. Xylo', 'Zebulon'],
          ['Zq9; expected singleton of type Boolean', 'Zq9'],
          ['Zq8 is not implemented for Zq7', 'Zq'],
          ['Zq6, but got', 'Zq6'],
        ),
        fc.string({ maxLength: 12 }),
        fc.constantFrom('raw', 'json', 'array'),
      )
      .map(([[value, secret], noise, form]) => {
        const v = `${value}${noise}`;
        return {
          secret,
          text: form === 'raw' ? v : form === 'json' ? JSON.stringify(v) : JSON.stringify([{ v }]),
        };
      });

    it('keeps no planted value in any fhirpath.js error message', () => {
      const all = Object.values(THROWS).flat();
      fc.assert(
        fc.property(fc.constantFrom(...all), planted, (template, { secret, text }) => {
          const msg = template.split('$').join(text);
          for (const kind of [Error, TypeError]) {
            const out = safeErrorMessage(new kind(msg));
            expect(out, msg).to.not.include(secret);
            expect(out.length).to.be.within(1, 120);
          }
        }),
        { numRuns: 2000 },
      );
    });

    it('keeps the value-free part of known messages, as fixed texts', () => {
      const cases: Array<[string, string]> = [
        ['Cannot convert Okafor-Smith to a number', 'Cannot convert a value to a number'],
        [
          'Expected singleton on right side of contains, got ["a","b"]',
          'Expected singleton on right side of contains',
        ],
        [
          'Unexpected collection[{"a":1},{"b":2}]; expected singleton of type Boolean',
          'Unexpected collection; expected singleton of type Boolean',
        ],
        ['Cannot ["Okafor-Smith"] - [1]', 'Cannot apply an arithmetic operator to these operands'],
        ['Cannot sort incomparable values', 'Cannot sort incomparable values'],
        ['Invalid decimal value: 12e5x', 'Invalid decimal value'],
        [
          'Sort expression evaluation error: Cannot convert Okafor to a number',
          'Sort expression evaluation error: Cannot convert a value to a number',
        ],
        ['something new from a later fhirpath.js: Okafor', 'expression failed at run time'],
      ];
      for (const [msg, want] of cases) {
        expect(safeErrorMessage(new Error(msg))).to.equal(want);
      }
      expect(safeErrorMessage(new SafeEvalError('card.detail: x'))).to.equal('card.detail: x');
      expect(
        safeErrorMessage(new TypeError("Cannot read properties of undefined (reading 'Okafor')")),
      ).to.equal('expression failed at run time (TypeError)');
    });
  });

  describe('5. a 4,000-term `and` chain', () => {
    it('is a validation problem at the rule, not a RangeError', async () => {
      const when = Array.from({ length: 4000 }, () => 'true').join(' and ');
      const problems = await problemsOf(pack([rule('wide', when)]));
      expect(problems.map((p) => p.path)).to.deep.equal(['rules[0].when']);
      expect(problems[0]?.message).to.match(/^expression is \d+ characters long \(limit 8192\)/);
    });

    it('is refused for its depth when it fits the length limit', async () => {
      const when = Array.from({ length: 900 }, () => 'true').join(' and ');
      const problems = await problemsOf(pack([rule('wide', when)]));
      expect(problems.map((p) => p.path)).to.deep.equal(['rules[0].when']);
      expect(problems[0]?.message).to.match(/^expression nests too deeply/);
    });
  });
});
