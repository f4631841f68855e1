import * as os from 'os'; import * as path from 'path'; import * as fs from 'fs';
import { buildTinyT5 } from '../../lib/tiny';
import { T5Model } from '../../lib/model';
import { IA3Adapter } from '../../lib/adapter';
import { Trainer } from '../../lib/trainer';
const POS = ['great','wonderful','delightful','superb','charming','brilliant','lovely','excellent'];
const NEG = ['awful','boring','dreadful','terrible','dull','clumsy','painful','weak'];
const NOUNS = ['movie','film','plot','cast','story','ending','script','soundtrack'];
function rng(seed:number){let s=seed>>>0;return()=>{s=(s+0x6d2b79f5)>>>0;let t=s;t=Math.imul(t^(t>>>15),t|1);t^=t+Math.imul(t^(t>>>7),t|61);return((t^(t>>>14))>>>0)/4294967296;};}
function make(n:number, seed:number){const r=rng(seed);const out=[];for(let i=0;i<n;i++){const lab=r()<0.5?1:0;const adj=(lab?POS:NEG)[Math.floor(r()*8)];const noun=NOUNS[Math.floor(r()*8)];out.push({text:`the ${noun} was ${adj}`,label:lab});}return out;}
test('demo feasibility', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(),'tfew-demo-'));
  const words = [...POS,...NEG,...NOUNS,'the','was','review','is','this','positive','negative','good','bad','?',':','or'];
  const t0=Date.now();
  buildTinyT5(dir,{words, seed: Number(process.env.MS ?? 1), dModel: Number(process.env.DM ?? 64), dFf: 128, numLayers: 2});
  const model = await T5Model.load(dir,{device:'cpu'});
  const train = make(32, 7), test = make(200, 99);
  const fmt=(e:any)=>({input:`review : ${e.text} . is this review good or bad ?`, choices:['bad','good'], label:e.label});
  const ad = IA3Adapter.create(model);
  const acc=async(a:any)=>{const r=await model.rankClassify(test.map(e=>fmt(e).input), test.map(()=>['bad','good']), {adapter:a}); return r.predictions.filter((p,i)=>p===test[i].label).length/test.length;};
  console.log('before', await acc(ad), Date.now()-t0);
  const tr = new Trainer(model, ad, {steps: Number(process.env.ST ?? 100), batchSize: 8, lr: Number(process.env.LR ?? 3e-2), seed: 1});
  let last:any; tr.on('step', e=>{ if(e.step%20===0) console.log(e.step, e.totalLoss.toFixed(3), e.lmLoss.toFixed(3)); last=e;});
  await tr.train(train.map(fmt));
  console.log('after', await acc(ad), Date.now()-t0);
  await model.dispose();
});
