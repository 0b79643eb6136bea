// orthonode status page: the token (kept in this tab's session storage), the buttons that need
// it (requeue, check a destination), and the live refresh of the studies page, which asks the
// JSON API for the same filters every few seconds (with the token, rows show the identifiers).
const REFRESH_MS = 5000;
function token(){return sessionStorage.getItem('orthonode-token')||'';}
function saveToken(){
  sessionStorage.setItem('orthonode-token',document.getElementById('token').value);
  refresh(); identify();
}
function authorised(){const h={}; const t=token(); if(t){h['Authorization']='Bearer '+t;} return h;}
async function requeue(path){
  const answer=await fetch(path,{method:'POST',headers:authorised()});
  const body=await answer.json().catch(()=>({}));
  const note=document.getElementById('requeue-result');
  if(answer.ok){note.textContent='requeued: '+body.requeued; setTimeout(()=>location.reload(),300);}
  else{note.textContent='refused ('+answer.status+'): '+(body.error||'');}
}
async function checkDestination(n){
  const note=document.getElementById('check-'+n);
  note.textContent='checking…';
  const answer=await fetch('/api/destinations/'+n+'/check',{method:'POST',headers:authorised()});
  const body=await answer.json().catch(()=>({}));
  if(!answer.ok){note.className='check-result bad'; note.textContent='refused ('+answer.status+'): '+(body.error||''); return;}
  note.className='check-result '+(body.ok?'ok':'bad');
  note.textContent=body.result+' ('+body.ms+' ms, '+body.when+')';
}
function live(){const box=document.getElementById('live'); return !box||box.checked;}
function saveLive(){sessionStorage.setItem('orthonode-live',live()?'1':'0');}
const shown={};
function put(id,html){
  const element=document.getElementById(id);
  if(element&&shown[id]!==html&&element.innerHTML!==html){element.innerHTML=html;}
  shown[id]=html;
}
async function refresh(){
  const area=document.getElementById('live-area');
  if(!area||!area.dataset.api){return;}
  try{
    const answer=await fetch(area.dataset.api,{headers:authorised()});
    if(!answer.ok){return;}
    const body=await answer.json();
    put('study-rows',body.html.rows);
    put('pager',body.html.pager);
    put('counts',body.html.counts);
    put('health-box',body.html.health);
    const table=document.getElementById('studies'), none=document.getElementById('no-studies');
    if(table){table.style.display=body.studies.length?'':'none';}
    if(none){none.style.display=body.studies.length?'none':'';}
  }catch(error){/* the node is restarting: the next round tries again */}
}
// A study's page: with a token, its accession number and patient ID (read once).
async function identify(){
  const facts=document.getElementById('identifiers');
  if(!facts||!token()){return;}
  const answer=await fetch(facts.dataset.api,{headers:authorised()}).catch(()=>null);
  if(!answer||!answer.ok){return;}
  const body=await answer.json();
  for(const cell of facts.querySelectorAll('td[data-field]')){
    const value=body[cell.dataset.field];
    if(cell.dataset.field&&value!==null&&value!==undefined){cell.textContent=value||'–';}
  }
}
window.addEventListener('load',()=>{
  const field=document.getElementById('token'); if(field){field.value=token();}
  const box=document.getElementById('live');
  if(box){box.checked=sessionStorage.getItem('orthonode-live')!=='0';}
  if(token()){refresh(); identify();}
  setInterval(()=>{if(live()){refresh();}},REFRESH_MS);
});
