// The rule that lets our kernels overlap the kernel before them (cuda/kernels/launch.cuh, cuda.programmaticLaunch),
// checked on the sources so that it holds for kernels no test runs: every kernel is launched through TFEW_LAUNCH
// (which carries the stream's programmatic attribute), and every __global__ function's first statement is
// wait_for_previous_kernel() (nothing may touch memory another kernel writes before it; a thread that returned
// first would end without waiting, and the next kernel could start before this launch's predecessor ended). The
// one exception, the few-row linears, requests constant weights first: there the wait comes with no return and no
// read of the input or output before it. The emulator checks at run time that every thread of a programmatic launch
// waited (test/gpu/cuda-programmatic-launch.test.ts, cuda-emulator-selftest); it cannot see a read placed before
// the wait, which is why the sources are held to the first-statement form.
import * as fs from 'fs';
import * as path from 'path';

const kernelsDir = path.join(__dirname, '..', 'cuda', 'kernels');
const sources = fs.readdirSync(kernelsDir).filter((f) => f.endsWith('.cu') || f.endsWith('.cuh'))
  .map((f) => ({ file: f, text: fs.readFileSync(path.join(kernelsDir, f), 'utf8') }));

// Comments and string literals blanked (same length), so that words in them are not taken for code.
function codeOnly(text: string): string {
  return text.replace(/\/\/[^\n]*|\/\*[\s\S]*?\*\/|"(?:\\.|[^"\\\n])*"/g, (m) => m.replace(/[^\n]/g, ' '));
}

function matching(text: string, open: number, openCh: string, closeCh: string): number {
  let depth = 0;
  for (let i = open; i < text.length; i++) {
    if (text[i] === openCh) depth++;
    else if (text[i] === closeCh && --depth === 0) return i;
  }
  throw new Error(`unbalanced ${openCh}${closeCh}`);
}

interface Kernel { file: string; name: string; body: string }

function kernels(): Kernel[] {
  const out: Kernel[] = [];
  for (const { file, text } of sources) {
    const code = codeOnly(text);
    for (let g = code.indexOf('__global__'); g >= 0; g = code.indexOf('__global__', g + 1)) {
      let i = g + '__global__'.length;
      let paren = code.indexOf('(', i);
      if (/__launch_bounds__\s*$/.test(code.slice(i, paren))) {
        i = matching(code, paren, '(', ')') + 1;
        paren = code.indexOf('(', i);
      }
      const name = /(\w+)\s*$/.exec(code.slice(i, paren))![1];
      let j = matching(code, paren, '(', ')') + 1;
      while (/\s/.test(code[j])) j++;
      if (code[j] !== '{') continue;  // a declaration
      out.push({ file, name, body: code.slice(j + 1, matching(code, j, '{', '}')) });
    }
  }
  return out;
}

describe('the kernel launch rule (cuda/kernels/launch.cuh)', () => {
  const all = kernels();

  test('the sources have kernels to check', () => {
    expect(all.length).toBeGreaterThan(30);
    expect(all.map((k) => k.name)).toEqual(expect.arrayContaining(['few_rows_linear_kernel', 'rmsnorm_forward_warp_kernel']));
  });

  test('every kernel waits for the kernel before it as its first statement', () => {
    const broken = all.filter((k) => k.name !== 'few_rows_linear_kernel' && !/^\s*wait_for_previous_kernel\(\);/.test(k.body))
      .map((k) => `${k.file}: ${k.name}`);
    expect(broken).toEqual([]);
  });

  test('the few-row linears read only their weights before the wait, and do not return before it', () => {
    const k = all.find((x) => x.name === 'few_rows_linear_kernel')!;
    const before = k.body.slice(0, k.body.indexOf('wait_for_previous_kernel();'));
    expect(before.length).toBeGreaterThan(0);
    expect(before).not.toMatch(/\breturn\b|p\.(x|a|out|norm_weight|index)\b|__syncthreads/);
    expect(before).toMatch(/load_w\(wq, warp\);\s*$/);  // the weight prefetch is the last thing before it
  });

  test('every launch in cuda/kernels goes through TFEW_LAUNCH (no <<< >>>)', () => {
    const launches = sources.filter((s) => s.file !== 'launch.cuh' && /<<</.test(codeOnly(s.text))).map((s) => s.file);
    expect(launches).toEqual([]);
  });
});

// A vector access (8 or 16 bytes, or a bf16 pair) faults on a GPU where its address is not a multiple of its size,
// and x86 does not care: every one goes through as_vector (kernels/device_common.cuh), which the emulator checks.
describe('vector accesses go through as_vector (checked for alignment by the emulator)', () => {
  // (to a vector type, from anything but the address of a value: `&aq[u]` of a local register array is exempt; C-style
  // casts too)
  const vectorType = '(?:u?(?:int|short|char|long|longlong)[1-4]|float[1-4]|double[1-4]|u?int(?:32|64)_t|__nv_bfloat162|__half2|half2)';
  const vectorCast = new RegExp(`reinterpret_cast<\\s*(?:const\\s+)?${vectorType}\\s*\\*\\s*>\\s*\\((?!\\s*&)` +
                                `|\\(\\s*(?:const\\s+)?${vectorType}\\s*\\*\\s*\\)\\s*(?!&)[\\w(]`, 'g');

  test('no reinterpret_cast to a vector pointer outside as_vector, but of a local value\'s address', () => {
    const found: string[] = [];
    for (const { file, text } of sources) {
      const code = codeOnly(text);
      for (const m of code.matchAll(vectorCast)) found.push(`${file}:${code.slice(0, m.index).split('\n').length}: ${m[0]}`);
    }
    expect(found).toEqual([]);
  });

  test('the rule sees a cast it forbids (and lets a local value\'s address through)', () => {
    const sample = 'uint4 q = *reinterpret_cast<const uint4*>(p + c);\nconst uint32_t* lo = reinterpret_cast<const uint32_t*>(&aq[0]);\n' +
      'float2 f = *(const float2*)(x + 2);\nshort4 s = *reinterpret_cast<short4*>(y);\nfloat* g = reinterpret_cast<float*>(z);';
    expect([...codeOnly(sample).matchAll(vectorCast)].map((m) => m[0]))
      .toEqual(['reinterpret_cast<const uint4*>(', '(const float2*)(', 'reinterpret_cast<short4*>(']);
  });
});
