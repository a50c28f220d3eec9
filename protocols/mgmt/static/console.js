(function(){"use strict";
var $=function(i){return document.getElementById(i)};var body=document.body;
var pts=[],MAX=2000,updates=0,current=null,NS="http://www.w3.org/2000/svg";
var tok=$("token");if(tok){tok.value=sessionStorage.getItem("drgw-token")||"";
tok.addEventListener("input",function(){sessionStorage.setItem("drgw-token",tok.value)})}
function el(n,a){var x=document.createElementNS(NS,n);for(var k in a)x.setAttribute(k,a[k]);return x}
function draw(){var svg=$("chart");if(!svg)return;while(svg.firstChild)svg.removeChild(svg.firstChild);
var W=Math.max(300,Math.round(svg.clientWidth||960)),H=300,L=48,R=8,T=8,B=22;
svg.setAttribute("viewBox","0 0 "+W+" "+H);if(pts.length<1){body.setAttribute("data-chart","0");return}
var t0=pts[0].t_ms,t1=pts[pts.length-1].t_ms;if(t1<=t0)t1=t0+1;var top=1;
pts.forEach(function(p){["target_w","facility_w"].forEach(function(k){if(p[k]!=null&&p[k]>top)top=p[k]});
var s=(p.battery_w>0?p.battery_w:0)+(p.gpu_shed_w||0);if(s>top)top=s});top*=1.08;
var x=function(t){return L+(W-L-R)*(t-t0)/(t1-t0)},y=function(v){return T+(H-T-B)*(1-v/top)};
for(var i=0;i<=4;i++){var v=top*i/4;svg.appendChild(el("line",{x1:L,x2:W-R,y1:y(v),y2:y(v),stroke:"#eaecf0"}));
var lb=el("text",{x:2,y:y(v)+4,"font-size":"11",fill:"#667085"});lb.textContent=(v/1000).toFixed(0)+" kW";svg.appendChild(lb)}
[[t0,"start"],[t1,"end"]].forEach(function(a){var tx=el("text",{x:a[1]==="start"?L:W-R,y:H-4,"font-size":"11",
fill:"#667085","text-anchor":a[1]});tx.textContent=new Date(a[0]).toISOString().slice(11,16)+" UTC";svg.appendChild(tx)});
function area(f,color){var d="",up=[],lo=[];pts.forEach(function(p){var v=f(p);up.push([x(p.t_ms),y(v[1])]);lo.push([x(p.t_ms),y(v[0])])});
up.forEach(function(q,i){d+=(i?"L":"M")+q[0].toFixed(1)+" "+q[1].toFixed(1)});
lo.reverse().forEach(function(q){d+="L"+q[0].toFixed(1)+" "+q[1].toFixed(1)});
svg.appendChild(el("path",{d:d+"Z",fill:color,"fill-opacity":"0.35",stroke:"none"}))}
var bat=function(p){return p.battery_w>0?p.battery_w:0};
area(function(p){return[0,bat(p)]},"var(--battery)");
area(function(p){return[bat(p),bat(p)+(p.gpu_shed_w||0)]},"var(--gpu)");
function line(k,color,dash){var d="",pen=false;pts.forEach(function(p){var v=p[k];if(v==null){pen=false;return}
d+=(pen?"L":"M")+x(p.t_ms).toFixed(1)+" "+y(v).toFixed(1);pen=true});
if(d)svg.appendChild(el("path",{d:d,fill:"none",stroke:color,"stroke-width":"2","stroke-dasharray":dash||""}))}
line("facility_w","var(--facility)");line("target_w","var(--target)","6 4");
body.setAttribute("data-chart",String(pts.length))}
window.addEventListener("resize",draw);
var es=new EventSource("/console/stream");
es.addEventListener("points",function(m){var add=JSON.parse(m.data);
for(var i=0;i<add.length;i++){if(!pts.length||add[i].t_ms>pts[pts.length-1].t_ms)pts.push(add[i])}
if(pts.length>MAX)pts.splice(0,pts.length-MAX);draw()});
es.addEventListener("status",function(m){var d=JSON.parse(m.data);for(var k in d.html){var s=$(k);if(s)s.innerHTML=d.html[k]}
updates++;body.setAttribute("data-updates",String(updates));var c=$("conn");c.className="ok";
c.textContent="live · "+String(d.now||"").slice(0,19).replace("T"," ")});
es.onerror=function(){var c=$("conn");c.className="bad";c.textContent="reconnecting…"};
var dlg=$("optout-dialog"),res=$("optout-result");
document.addEventListener("click",function(ev){var b=ev.target.closest?ev.target.closest("button.optout"):null;
if(!b)return;current=b.getAttribute("data-event");$("optout-event").textContent=current;res.textContent="";
$("optout-reason").value="";dlg.showModal()});
$("optout-confirm").addEventListener("click",function(ev){ev.preventDefault();var reason=$("optout-reason").value.trim();
if(!reason){res.textContent="A reason is required.";return}
var h={"Content-Type":"application/json"};var t=tok?tok.value.trim():"";if(t)h.Authorization="Bearer "+t;
res.textContent="Sending…";fetch("/events/"+encodeURIComponent(current)+"/opt-out",{method:"POST",headers:h,
credentials:"same-origin",body:JSON.stringify({reason:reason})}).then(function(r){return r.json().then(function(j){
if(r.ok&&j.ok){body.setAttribute("data-optout","ok");res.textContent="Opted out"+(j.sent_to_vtn?
", and the utility was told.":" (the utility is told at the next poll).");setTimeout(function(){dlg.close()},1500)}
else{body.setAttribute("data-optout","refused:"+r.status);res.textContent="Refused ("+r.status+"): "+(j.error||j.note||"")}})})
.catch(function(e){body.setAttribute("data-optout","error");res.textContent="Failed: "+e})});
})();
