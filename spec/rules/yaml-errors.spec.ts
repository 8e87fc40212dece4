import { expect } from 'chai';
import { parseDocument } from 'yaml';
import { PackValidationError, parsePackText, validatePackInWorker } from '../../rules/index.ts';
import type { PackProblem } from '../../rules/index.ts';

function errorOf(fn: () => unknown): PackValidationError {
  try {
    fn();
  } catch (err) {
    expect(err).to.be.instanceOf(PackValidationError);
    return err as PackValidationError;
  }
  expect.fail('expected a PackValidationError');
}

function problemsOf(fn: () => unknown): PackProblem[] {
  return errorOf(fn).problems;
}

/** A pack whose first key is indented by mistake: every token after it is an error. */
const INDENTED_FIRST = [
  '# a comment',
  '',
  '  id: my-pack',
  'version: 1.0.0',
  'title: T',
  'publisher: P',
  'description: D',
  'services:',
  ...Array.from({ length: 200 }, (_, i) => `  - { id: s${i}, hook: order-sign, description: x }`),
  'rules: []',
  '',
].join('\n');

describe('rules: YAML syntax errors', () => {
  it('keeps only the first 5 YAML errors, and counts every one found (no summary "problem")', () => {
    const found = parseDocument(INDENTED_FIRST, { uniqueKeys: true }).errors.length;
    expect(found).to.be.greaterThan(5);
    const err = errorOf(() => parsePackText(INDENTED_FIRST, 'yaml'));
    expect(err.problems).to.have.length(5);
    expect(
      err.problems.every(
        (p) => p.path === '(document)' && p.message.startsWith('YAML syntax error at line '),
      ),
    ).to.equal(true);
    expect(err.total).to.equal(found);
    expect(err.message).to.equal(`rule pack is invalid: ${found} problem(s), first 5 shown`);
  });

  it('counts exactly the problems it lists when none were left out', () => {
    const err = errorOf(() => parsePackText('id: a\nversion: 1.0.0\nid: b\nid: c\n'));
    expect(err.problems).to.have.length(2);
    expect(err.total).to.equal(2);
    expect(err.message).to.equal('rule pack is invalid: 2 problem(s)');
  });

  it('points at an indented first key', () => {
    const problems = problemsOf(() => parsePackText(INDENTED_FIRST, 'yaml'));
    expect(problems[0]?.message).to.match(
      /^YAML syntax error at line 4, column 1: .*; line 3 \(the first key\) is indented by 2 spaces: top-level keys start at column 1$/,
    );
  });

  it('keeps every error when there are few', () => {
    const problems = problemsOf(() => parsePackText('id: a\nversion: 1.0.0\nid: b\n'));
    expect(problems).to.deep.equal([
      {
        path: '(document)',
        message: 'YAML syntax error at line 3, column 1: Map keys must be unique',
      },
    ]);
  });

  it('gives an upload (validatePackInWorker) the same problems', async () => {
    const local = errorOf(() => parsePackText(INDENTED_FIRST, 'yaml'));
    const expected = local.problems;
    try {
      await validatePackInWorker({ text: INDENTED_FIRST, format: 'yaml' });
      expect.fail('expected a PackValidationError');
    } catch (err) {
      expect(err).to.be.instanceOf(PackValidationError);
      expect((err as PackValidationError).problems).to.deep.equal(expected);
      // The count, and the message an upload's 422 carries, cross the worker too.
      expect((err as PackValidationError).total).to.equal(local.total);
      expect((err as PackValidationError).message).to.equal(local.message);
    }
  });
});
