// orthonode status page: requeue buttons with the token kept in session storage
function token(){return sessionStorage.getItem('orthonode-token')||'';}
function saveToken(){sessionStorage.setItem('orthonode-token',document.getElementById('token').value);}
async function requeue(path){
  const headers={}; const t=token(); if(t){headers['Authorization']='Bearer '+t;}
  const answer=await fetch(path,{method:'POST',headers:headers});
  const body=await answer.json().catch(()=>({}));
  const note=document.getElementById('requeue-result');
  if(answer.ok){note.textContent='requeued: '+body.requeued; setTimeout(()=>location.reload(),300);}
  else{note.textContent='refused ('+answer.status+'): '+(body.error||'');}
}
window.addEventListener('load',()=>{const f=document.getElementById('token'); if(f){f.value=token();}});
